//! Transfer learning on tabular and image data, as `metalearn train` and `finetune` do it: read
//! a CSV file or an image folder ([`model_data`]), decide the output head and loss from the
//! target ([`head`]), train with a validation split, a log and the best epoch kept ([`fit`]), and
//! read the same from a TOML file ([`config`]).

pub mod config;
pub mod fit;
pub mod head;
pub mod image;
pub mod imported;
pub mod model_data;
pub mod probe;
pub mod text;

pub use fit::{fit_and_save, optimizer_from, FitReport, TrainPlan};
pub use head::{detect_target, parse_hidden, plan_head, push_head, HeadPlan};
pub use imported::import_keras;
pub use model_data::{
    load_dataset, load_for_model, load_model, log_path, save_model, DataFiles, DataInfo,
    DataSource, ImageShape, OutputKind, TargetKind, DATA_SECTION,
};
