//! Transfer learning on XOR: pre-train a 2-16-1 MLP, save it, load the weights into a fresh model
//! and fine-tune it on new labels, printing loss and accuracy before and after each phase.
//!
//! Run with `cargo run --release --example xor_transfer [SEED]`.

use metalearn::demos::xor::{prefer_one_thread, run_xor_demo, XorDemoOptions};

fn main() -> metalearn::Result<()> {
    prefer_one_thread();
    let seed = match std::env::args().nth(1) {
        Some(text) => text.parse().map_err(|_| {
            metalearn::Error::Config(format!("the seed must be a whole number, got `{text}`"))
        })?,
        None => 0,
    };
    let report = run_xor_demo(&XorDemoOptions {
        seed,
        ..XorDemoOptions::default()
    })?;
    for line in report.lines() {
        println!("{line}");
    }
    Ok(())
}
