//! The data side of a supervised model: where its examples come from ([`DataSource`],
//! [`DataFiles`]), the checkpoint's `data` section ([`DataInfo`]: feature and class names, what
//! the output means), and loading examples for training or for a trained model.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::data::image_folder::{load_image_folder, ImageFolderOptions};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::sequential::Sequential;

/// The data files named on a command line: `--data FILE [--target COLUMN]` or `--images DIR`.
#[derive(Clone, Debug, Default)]
pub struct DataFiles {
    /// CSV file with a header row and one example per row.
    pub data: Option<PathBuf>,
    /// The CSV column to predict.
    pub target: Option<String>,
    /// Image folder with one sub-folder per class.
    pub images: Option<PathBuf>,
    /// Feature columns for a model without stored feature names (else every column but the
    /// target, in file order).
    pub features: Option<Vec<String>>,
}

/// Name of the checkpoint section that describes the data a model was trained on.
pub const DATA_SECTION: &str = "data";

/// Where the examples of one run come from, once flags and config are merged.
#[derive(Clone, Debug)]
pub enum DataSource {
    /// A CSV file and its target column.
    Csv {
        /// The file.
        path: PathBuf,
        /// The target column.
        target: String,
    },
    /// An image folder.
    Images {
        /// The folder.
        dir: PathBuf,
        /// Size and channels every image is converted to.
        options: ImageFolderOptions,
    },
}

impl DataSource {
    /// The file or folder.
    pub fn path(&self) -> &Path {
        match self {
            DataSource::Csv { path, .. } => path,
            DataSource::Images { dir, .. } => dir,
        }
    }
}

/// What the target is, which fixes the output head and the default loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    /// More than two classes: `k` logits and cross-entropy.
    Multiclass,
    /// Two classes (0/1): one output and binary cross-entropy.
    Binary,
    /// A number: one output and mean squared error.
    Regression,
}

/// What the network's output means, so that `predict` turns it into probabilities or values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// One logit per class (softmax gives probabilities).
    ClassLogits,
    /// One probability of class 1 (after a sigmoid layer).
    Probability,
    /// One logit of class 1 (sigmoid gives the probability).
    BinaryLogit,
    /// Regression values.
    Value,
}

/// Image size and channels of an image model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageShape {
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// 1 (grey) or 3 (colour).
    pub channels: usize,
}

/// The checkpoint's `data` section: enough to read new data the way the training data was read
/// and to name the predictions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    /// What the target is.
    pub target_kind: TargetKind,
    /// What the output means.
    pub output: OutputKind,
    /// Feature columns in the order the model reads them (empty for images).
    pub feature_names: Vec<String>,
    /// The target column (or `class` for image folders).
    pub target_name: String,
    /// Class names by class id, when the target is categorical.
    #[serde(default)]
    pub class_names: Option<Vec<String>>,
    /// Number of classes for classification targets.
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// Set for image models.
    #[serde(default)]
    pub image: Option<ImageShape>,
    /// The training data's origin.
    #[serde(default)]
    pub source: String,
    /// For a classifier imported from Keras: whether its Keras form ended in a softmax (left
    /// off here, where classifiers output logits). `None` (metalearn's own classifiers): a
    /// Keras export adds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keras_softmax: Option<bool>,
}

impl DataInfo {
    /// The display name of class `id`: its name when known, else the id.
    pub fn class_label(&self, id: usize) -> String {
        self.class_names
            .as_ref()
            .and_then(|names| names.get(id).cloned())
            .unwrap_or_else(|| id.to_string())
    }
}

/// Loads examples for training (class ids follow `class_names` when given).
pub fn load_dataset(source: &DataSource, class_names: Option<&[String]>) -> Result<Dataset> {
    let ds = match source {
        DataSource::Csv { path, target } => {
            crate::data::csv::load_csv_with_classes(path, target, class_names)?
        }
        DataSource::Images { dir, options } => {
            let ds = load_image_folder(dir, options)?;
            if let (Some(expected), Some(found)) = (class_names, ds.class_names.as_ref()) {
                if expected != found.as_slice() {
                    return Err(Error::Data(format!(
                        "{}: class folders {:?} differ from the model's classes {:?}; use the same \
                         folder names (or `finetune --new-head N` for new classes)",
                        dir.display(),
                        found,
                        expected
                    )));
                }
            }
            ds
        }
    };
    if ds.is_empty() {
        return Err(Error::Data(format!(
            "{}: no examples found",
            source.path().display()
        )));
    }
    Ok(ds)
}

/// Loads examples for a trained model: CSV features are taken by the model's column names (so
/// extra or reordered columns are fine) and targets, when wanted, are mapped to its class ids.
pub fn load_for_model(
    info: &DataInfo,
    model: &Sequential,
    data: &DataFiles,
    with_target: bool,
) -> Result<(Tensor, Option<Tensor>, usize)> {
    let (x, y) = match (&data.data, &data.images) {
        (Some(path), _) => {
            if info.image.is_some() {
                return Err(Error::Config(
                    "this model was trained on images: give --images DIR, not --data".into(),
                ));
            }
            // A model without stored feature names (imported from Keras) reads every column but
            // the target, in file order.
            let features =
                if let (true, Some(named)) = (info.feature_names.is_empty(), &data.features) {
                    named.iter().map(|n| n.trim().to_string()).collect()
                } else if info.feature_names.is_empty() {
                    let target = data.target.as_deref().unwrap_or(&info.target_name);
                    crate::data::csv::column_names(path)?
                        .into_iter()
                        .filter(|c| c != target)
                        .collect()
                } else {
                    info.feature_names.clone()
                };
            let expected: usize = model.architecture().input_shape.iter().product();
            if info.feature_names.is_empty() && features.len() != expected {
                if data.features.is_some() {
                    return Err(Error::Shape(format!(
                        "--features names {} columns, but the model reads {expected} features",
                        features.len()
                    )));
                }
                return Err(Error::Shape(format!(
                    "{}: this model (imported without feature names) reads its {expected} \
                     features from the CSV columns in file order, but the file has {} columns \
                     besides the target; give --target COLUMN to leave the label out, or a file \
                     of {expected} feature columns",
                    path.display(),
                    features.len()
                )));
            }
            let x = crate::data::csv::load_csv_features(path, &features)?;
            let y = if with_target {
                let target = data.target.as_deref().unwrap_or(&info.target_name);
                let ds = crate::data::csv::load_csv_with_classes(
                    path,
                    target,
                    info.class_names.as_deref(),
                )?;
                Some(ds.y)
            } else {
                None
            };
            (x, y)
        }
        (None, Some(dir)) => {
            let shape = info.image.ok_or_else(|| {
                Error::Config(
                    "this model was trained on CSV data: give --data FILE, not --images".into(),
                )
            })?;
            let ds = load_dataset(
                &DataSource::Images {
                    dir: dir.clone(),
                    options: ImageFolderOptions {
                        height: shape.height,
                        width: shape.width,
                        channels: shape.channels,
                    },
                },
                info.class_names.as_deref(),
            )?;
            (ds.x, with_target.then_some(ds.y))
        }
        (None, None) => {
            return Err(Error::Config(
                "no input data: give --data FILE (CSV) or --images DIR".into(),
            ))
        }
    };
    let n = x.dim(0)?;
    let expected = &model.architecture().input_shape;
    if &x.dims()[1..] != expected.as_slice() {
        return Err(Error::Shape(format!(
            "the data has examples of shape {:?} but the model expects {:?}",
            &x.dims()[1..],
            expected
        )));
    }
    Ok((x, y, n))
}

/// Reads a checkpoint into a model and its `data` section.
pub fn load_model(path: &Path) -> Result<(Sequential, DataInfo)> {
    let ckpt = Checkpoint::load(path, &candle_core::Device::Cpu)?;
    let info: DataInfo = match ckpt.section(DATA_SECTION) {
        Some(value) => serde_json::from_value(value.clone()).map_err(|e| {
            Error::Checkpoint(format!(
                "{}: invalid `{DATA_SECTION}` section: {e}",
                path.display()
            ))
        })?,
        None => {
            return Err(Error::Checkpoint(format!(
                "{}: has no `{DATA_SECTION}` section (feature and class names); it was not \
                 written by `metalearn train` or `metalearn finetune`",
                path.display()
            )))
        }
    };
    let model = Sequential::from_checkpoint(&ckpt)?;
    Ok((model, info))
}

/// Saves `model` with its `data` section, atomically.
pub fn save_model(model: &Sequential, info: &DataInfo, path: &Path) -> Result<()> {
    let mut ckpt = model.to_checkpoint()?;
    ckpt.sections.insert(
        DATA_SECTION.into(),
        serde_json::to_value(info).map_err(|e| Error::Checkpoint(e.to_string()))?,
    );
    ckpt.save(path)
}

/// The JSONL log beside a checkpoint: `<out>.log.jsonl`.
pub fn log_path(out: &Path) -> PathBuf {
    let mut name = OsString::from(out.as_os_str());
    name.push(".log.jsonl");
    PathBuf::from(name)
}
