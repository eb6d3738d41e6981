//! Labelled data sets held in memory, read from CSV files ([`csv`]) or from folders of images
//! sorted into one sub-folder per class ([`image_folder`]).
//!
//! Every loader returns a [`Dataset`]: inputs `x` as an f32 tensor `[n, input_shape...]` and
//! targets `y` as an f32 tensor `[n]` (class ids stored as floats, or regression values). Loaders
//! never panic on bad input: each error names the file, the line and column (CSV) or the path
//! (images), and says what to do.

pub mod augment;
pub mod classes;
pub mod clinc150;
pub mod csv;
pub mod fetch;
pub mod image_folder;
pub mod image_list;
pub mod movielens;
pub mod omniglot;
pub mod ratings;
pub mod text;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// A labelled data set held in memory.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Inputs, f32, shaped `[n, input_shape...]`.
    pub x: Tensor,
    /// Targets, f32, shaped `[n]`: class ids as floats, or regression values.
    pub y: Tensor,
    /// CSV column names used as features, in the order of `x`'s columns (empty for images).
    pub feature_names: Vec<String>,
    /// The CSV target column, or `"class"` for image folders.
    pub target_name: String,
    /// The class names when the target is categorical: class id `i` is `class_names[i]`.
    pub class_names: Option<Vec<String>>,
    /// The file or folder the data came from (recorded in checkpoints as provenance).
    pub source: String,
}

impl Dataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.x.dims().first().copied().unwrap_or(0)
    }

    /// Whether the data set has no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape of one example: `x`'s dimensions without the first.
    pub fn input_shape(&self) -> Vec<usize> {
        self.x.dims().iter().skip(1).copied().collect()
    }

    /// The number of classes when the target is categorical.
    pub fn num_classes(&self) -> Option<usize> {
        self.class_names.as_ref().map(Vec::len)
    }

    /// The targets as class ids; an error names the first target that is not a whole number
    /// `>= 0` (or, for categorical data, not below the number of classes).
    pub fn class_ids(&self) -> Result<Vec<usize>> {
        let values = self
            .y
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let limit = self.num_classes();
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let integral = v.is_finite() && v >= 0.0 && v.fract() == 0.0;
                match limit {
                    Some(k) if integral && (v as usize) < k => Ok(v as usize),
                    None if integral => Ok(v as usize),
                    _ => Err(Error::Data(format!(
                        "{}: target `{}` of example {} is {v}, not a class id (a whole number \
                         >= 0{}); use a classification target, or a regression loss for \
                         continuous values",
                        self.source,
                        self.target_name,
                        i + 1,
                        limit.map_or(String::new(), |k| format!(" and < {k}")),
                    ))),
                }
            })
            .collect()
    }

    /// The examples at `indices` (in that order; repeats allowed), with the same names and
    /// classes.
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset> {
        let n = self.len();
        if let Some(&bad) = indices.iter().find(|&&i| i >= n) {
            return Err(Error::Data(format!(
                "{}: example index {bad} is out of range (the data set has {n} examples)",
                self.source
            )));
        }
        let ids: Vec<u32> = indices
            .iter()
            .map(|&i| {
                u32::try_from(i).map_err(|_| {
                    Error::Data(format!(
                        "{}: example index {i} is too large to select",
                        self.source
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let ids = Tensor::from_vec(ids, indices.len(), &Device::Cpu)?.to_device(self.x.device())?;
        Ok(Dataset {
            x: self.x.index_select(&ids, 0)?,
            y: self.y.index_select(&ids, 0)?,
            feature_names: self.feature_names.clone(),
            target_name: self.target_name.clone(),
            class_names: self.class_names.clone(),
            source: self.source.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Dataset {
        let x = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[0f32, 1., 0.], &Device::Cpu).unwrap();
        Dataset {
            x,
            y,
            feature_names: vec!["a".into(), "b".into()],
            target_name: "t".into(),
            class_names: Some(vec!["no".into(), "yes".into()]),
            source: "toy.csv".into(),
        }
    }

    #[test]
    fn subset_selects_rows_in_order() {
        let ds = toy();
        let sub = ds.subset(&[2, 0, 2]).unwrap();
        assert_eq!(sub.len(), 3);
        assert_eq!(
            sub.x.to_vec2::<f32>().unwrap(),
            vec![vec![5., 6.], vec![1., 2.], vec![5., 6.]]
        );
        assert_eq!(sub.class_ids().unwrap(), vec![0, 0, 0]);
        assert_eq!(sub.class_names, ds.class_names);
        let empty = ds.subset(&[]).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.input_shape(), vec![2]);
    }

    #[test]
    fn subset_rejects_out_of_range_index() {
        let err = toy().subset(&[0, 3]).unwrap_err().to_string();
        assert!(err.contains("toy.csv") && err.contains('3'), "{err}");
    }

    #[test]
    fn class_ids_reject_fractions_negatives_and_unknown_ids() {
        for bad in [0.5f32, -1.0, 2.0, f32::NAN] {
            let mut ds = toy();
            ds.y = Tensor::new(&[0f32, bad, 1.], &Device::Cpu).unwrap();
            let err = ds.class_ids().unwrap_err().to_string();
            assert!(err.contains("example 2") && err.contains("`t`"), "{err}");
        }
        let mut regression = toy();
        regression.class_names = None;
        regression.y = Tensor::new(&[0f32, 7., 1.], &Device::Cpu).unwrap();
        assert_eq!(regression.class_ids().unwrap(), vec![0, 7, 1]);
        assert_eq!(regression.num_classes(), None);
    }
}
