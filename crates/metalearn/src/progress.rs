//! Progress bars (indicatif), hidden when not wanted.

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar of `len` steps with an ETA, or a hidden one when `visible` is false.
pub fn bar(len: u64, visible: bool, label: &str) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{label} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} eta {{eta}} {{msg}}"
        ))
        .expect("valid template"),
    );
    bar
}
