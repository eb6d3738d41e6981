//! Ordered, named parameter sets.
//!
//! A [`ParamSet`] is the whole state a network's forward pass reads: an ordered list of
//! `(name, tensor)` pairs. The same network runs with any parameter set of the same names and
//! shapes, which is what meta-learning needs: fast weights, Meta-SGD learning rates and ANIL's
//! adapted head are all parameter sets.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

/// An ordered set of named tensors.
#[derive(Clone, Debug, Default)]
pub struct ParamSet {
    names: Vec<String>,
    tensors: Vec<Tensor>,
    index: HashMap<String, usize>,
}

impl ParamSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a set from `(name, tensor)` pairs, keeping their order.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, Tensor)>) -> Result<Self> {
        let mut set = Self::new();
        for (name, tensor) in pairs {
            set.insert(name, tensor)?;
        }
        Ok(set)
    }

    /// Appends a tensor; a duplicate name is an error.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Result<()> {
        let name = name.into();
        if self.index.contains_key(&name) {
            return Err(Error::Config(format!("duplicate parameter name `{name}`")));
        }
        self.index.insert(name.clone(), self.names.len());
        self.names.push(name);
        self.tensors.push(tensor);
        Ok(())
    }

    /// Replaces the tensor stored under an existing name.
    pub fn replace(&mut self, name: &str, tensor: Tensor) -> Result<()> {
        let i = self.position(name)?;
        self.tensors[i] = tensor;
        Ok(())
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        Ok(&self.tensors[self.position(name)?])
    }

    /// The tensor named `name`, if present.
    pub fn try_get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    fn position(&self, name: &str) -> Result<usize> {
        self.index.get(name).copied().ok_or_else(|| {
            Error::Config(format!(
                "no parameter named `{name}` (known: {})",
                self.names.join(", ")
            ))
        })
    }

    /// Whether a tensor named `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Parameter names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Tensors, in order.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    /// `(name, tensor)` pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.names.iter().zip(self.tensors.iter())
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Total number of scalar values.
    pub fn num_values(&self) -> usize {
        self.tensors.iter().map(|t| t.elem_count()).sum()
    }

    /// A new set with `f` applied to every tensor (same names, same order).
    pub fn map(&self, mut f: impl FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<Self> {
        let tensors = self
            .iter()
            .map(|(n, t)| f(n, t))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            names: self.names.clone(),
            tensors,
            index: self.index.clone(),
        })
    }

    /// A new set with `f` applied pairwise to this set and `other` (matched by name).
    pub fn zip_map(
        &self,
        other: &ParamSet,
        mut f: impl FnMut(&str, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        self.map(|n, a| f(n, a, other.get(n)?))
    }

    /// A copy with every tensor detached from the computation graph.
    pub fn detach(&self) -> Self {
        self.map(|_, t| Ok(t.detach())).expect("detach cannot fail")
    }

    /// A copy converted to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        self.map(|_, t| Ok(t.to_dtype(dtype)?))
    }

    /// The subset of tensors whose names satisfy `keep`, in order.
    pub fn filter(&self, mut keep: impl FnMut(&str) -> bool) -> Self {
        Self::from_pairs(
            self.iter()
                .filter(|(n, _)| keep(n))
                .map(|(n, t)| (n.clone(), t.clone())),
        )
        .expect("names are unique")
    }

    /// A copy where tensors named in `other` are replaced by `other`'s.
    pub fn overlay(&self, other: &ParamSet) -> Self {
        self.map(|n, t| Ok(other.try_get(n).unwrap_or(t).clone()))
            .expect("overlay cannot fail")
    }

    /// Fresh trainable variables holding copies of these tensors.
    pub fn to_vars(&self) -> Result<Vec<Var>> {
        self.tensors
            .iter()
            .map(|t| Ok(Var::from_tensor(t)?))
            .collect()
    }

    /// Wraps variables (same order as `names`) as a parameter set sharing their storage.
    pub fn from_vars(names: &[String], vars: &[Var]) -> Result<Self> {
        Self::from_pairs(
            names
                .iter()
                .cloned()
                .zip(vars.iter().map(|v| v.as_tensor().clone())),
        )
    }

    /// Flattens every tensor to `f64` values, in order.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(self.num_values());
        for t in &self.tensors {
            out.extend(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
        Ok(out)
    }
}
