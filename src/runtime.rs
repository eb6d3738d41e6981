//! Process-wide settings of the tensor engine.

use std::sync::Once;

static INIT: Once = Once::new();

/// Enables gradients of gradients (second-order MAML) in candle.
///
/// candle detaches every gradient during backprop unless `CANDLE_GRAD_DO_NOT_DETACH` is set; the
/// variable is read once per thread at that thread's first backward pass, so it is set here,
/// before any network exists. First-order code paths detach their gradients explicitly.
pub fn init() {
    INIT.call_once(|| {
        if std::env::var_os("CANDLE_GRAD_DO_NOT_DETACH").is_none() {
            std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
        }
    });
}
