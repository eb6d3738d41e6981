//! A text classifier: a sentence encoder with a dense head over its embedding, the class
//! names, and the out-of-scope rule (a label answered when the top probability is below a
//! threshold). Saved as one self-contained checkpoint: architecture, weights, the tokenizer's
//! JSON, the base encoder's name and SHA-256, classes and threshold, so `predict` needs nothing
//! else.

use std::path::Path;

use candle_core::{Device, Tensor, D};
use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::nn::architecture::Architecture;
use crate::nn::network::Network;
use crate::nn::ops;
use crate::nn::params::ParamSet;
use crate::text::encoder::forward_sequences;
use crate::text::{
    EncoderSource, TextEncoder, TextSection, TextTokenizer, UnknownRule, HEAD, TEXT_SECTION,
};

/// A sentence encoder with a classification head.
#[derive(Clone, Debug)]
pub struct TextClassifier {
    pub(crate) network: Network,
    pub(crate) params: ParamSet,
    pub(crate) tokenizer: TextTokenizer,
    pub(crate) section: TextSection,
}

/// One prediction.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TextPrediction {
    /// The predicted label (the unknown label below the threshold).
    pub label: String,
    /// The top class probability.
    pub confidence: f64,
    /// The best known class, even when the answer is the unknown label.
    pub best_class: String,
}

impl TextClassifier {
    /// Assembles a classifier; the architecture must read tokens and end in the head.
    pub fn new(
        architecture: Architecture,
        params: ParamSet,
        tokenizer: TextTokenizer,
        section: TextSection,
    ) -> Result<Self> {
        let network = Network::build(&architecture)?;
        if !network.reads_tokens()
            || architecture.layers.last().map(|l| l.name.as_str()) != Some(HEAD)
        {
            return Err(Error::Config(
                "a text classifier reads token ids and ends in a layer named `head`".into(),
            ));
        }
        if network.output_shape() != [section.classes.len()] {
            return Err(Error::Shape(format!(
                "the head has {:?} outputs for {} classes",
                network.output_shape(),
                section.classes.len()
            )));
        }
        Ok(Self {
            network,
            params,
            tokenizer,
            section,
        })
    }

    /// The network.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The weights.
    pub fn params(&self) -> &ParamSet {
        &self.params
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Class names by id.
    pub fn classes(&self) -> &[String] {
        &self.section.classes
    }

    /// The out-of-scope rule, if any.
    pub fn unknown(&self) -> Option<&UnknownRule> {
        self.section.unknown.as_ref()
    }

    /// Sets the out-of-scope rule.
    pub fn set_unknown(&mut self, rule: Option<UnknownRule>) {
        self.section.unknown = rule;
    }

    /// The checkpoint's text section (encoder, method, columns).
    pub fn section(&self) -> &TextSection {
        &self.section
    }

    /// Index of the first layer of the head (everything before it is the encoder).
    pub fn head_index(&self) -> usize {
        self.network.architecture().layers.len() - 1
    }

    /// Class probabilities `[texts, classes]` (inference mode), in batches of `batch_size`
    /// sorted by length.
    pub fn probabilities(&self, texts: &[&str], batch_size: usize) -> Result<Tensor> {
        let logits =
            self.forward_sorted(texts, batch_size, self.network.architecture().layers.len())?;
        ops::softmax(&logits)
    }

    /// Encoder outputs `[texts, dim]` (the head's input).
    pub fn embed(&self, texts: &[&str], batch_size: usize) -> Result<Tensor> {
        self.forward_sorted(texts, batch_size, self.head_index())
    }

    /// Runs the first `layers` layers on the texts, longest first in batches, and returns the
    /// rows in the texts' order, as f32.
    fn forward_sorted(&self, texts: &[&str], batch_size: usize, layers: usize) -> Result<Tensor> {
        let (sequences, _) = self.tokenizer.encode_each(texts)?;
        let rows = forward_sequences(
            &self.network,
            &self.params,
            &self.tokenizer,
            &sequences,
            batch_size,
            layers,
        )?;
        let width = rows.len() / texts.len().max(1);
        Ok(Tensor::from_vec(rows, (texts.len(), width), &Device::Cpu)?)
    }

    /// Predicts a label for every text; below the threshold of the unknown rule the answer is
    /// its label.
    pub fn predict(&self, texts: &[&str], batch_size: usize) -> Result<Vec<TextPrediction>> {
        let probabilities = self.probabilities(texts, batch_size)?;
        let best = probabilities.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let top = probabilities.max(D::Minus1)?.to_vec1::<f32>()?;
        Ok(best
            .iter()
            .zip(top)
            .map(|(&class, confidence)| {
                let best_class = self.section.classes[class as usize].clone();
                let label = match &self.section.unknown {
                    Some(rule) if (confidence as f64) < rule.threshold => rule.label.clone(),
                    _ => best_class.clone(),
                };
                TextPrediction {
                    label,
                    confidence: confidence as f64,
                    best_class,
                }
            })
            .collect())
    }

    /// The classifier as a checkpoint.
    pub fn to_checkpoint(&self) -> Result<Checkpoint> {
        let mut stored = self.params.detach();
        let mut external = Vec::new();
        if self.section.adapters_only {
            stored = ParamSet::new();
            for (name, tensor) in self.params.iter() {
                if is_adapter_or_head(name) {
                    stored.insert(name.clone(), tensor.detach())?;
                } else {
                    external.push(name.clone());
                }
            }
        }
        let mut ckpt =
            Checkpoint::new(self.network.architecture().clone(), stored, ParamSet::new());
        ckpt.external_params = external;
        ckpt.provenance.data = Some(self.section.base.encoder.name.clone());
        ckpt.sections.insert(
            TEXT_SECTION.into(),
            serde_json::to_value(&self.section).expect("text section serialises"),
        );
        Ok(ckpt)
    }

    /// Saves the classifier to one checkpoint file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.to_checkpoint()?.save(path)
    }

    /// Whether a checkpoint holds a text model.
    pub fn is_text_checkpoint(ckpt: &Checkpoint) -> bool {
        ckpt.section(TEXT_SECTION).is_some()
    }

    /// Reads a classifier saved by [`TextClassifier::save`]. A checkpoint of adapters only
    /// reads its base encoder from `base` (a folder or `hf:` name), or from where it was
    /// trained when `base` is `None`.
    pub fn load(path: &Path, base: Option<&Path>) -> Result<Self> {
        Self::load_if_text(path, base)?.ok_or_else(|| {
            Error::Checkpoint(format!(
                "{}: this checkpoint holds no text model (no `text` section); text commands \
                 need a model trained with --encoder",
                path.display()
            ))
        })
    }

    /// Reads the classifier in `path` when the checkpoint holds a text model; `None` for any
    /// other model (commands that read both kinds try this first). `base` is as for
    /// [`TextClassifier::load`].
    pub fn load_if_text(path: &Path, base: Option<&Path>) -> Result<Option<Self>> {
        let ckpt = Checkpoint::load_partial(path, &Device::Cpu)?;
        if !Self::is_text_checkpoint(&ckpt) {
            if !ckpt.external_params.is_empty() {
                // Only text models are saved in parts; refuse like `Checkpoint::load` does.
                Checkpoint::load(path, &Device::Cpu)?;
            }
            return Ok(None);
        }
        Self::from_checkpoint(&ckpt, base)
            .map(Some)
            .map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))
    }

    /// Rebuilds a classifier from a loaded checkpoint (`base` as for
    /// [`TextClassifier::load`]).
    pub fn from_checkpoint(ckpt: &Checkpoint, base: Option<&Path>) -> Result<Self> {
        let section = TextSection::of(ckpt)?.ok_or_else(|| {
            Error::Checkpoint(
                "this checkpoint holds no text model (no `text` section); text commands need a \
                 model trained with --encoder"
                    .into(),
            )
        })?;
        let tokenizer = section.tokenizer()?;
        let mut params = ckpt.params.clone();
        if !ckpt.external_params.is_empty() {
            let default_base = std::path::PathBuf::from(&section.base.encoder.name);
            let base_weights =
                read_base_weights(&section.base.encoder, base.unwrap_or(&default_base))?;
            for name in &ckpt.external_params {
                let tensor = base_weights.try_get(name).ok_or_else(|| {
                    Error::Checkpoint(format!(
                        "the base encoder has no tensor `{name}` that the adapters need"
                    ))
                })?;
                params.insert(name.clone(), tensor.clone())?;
            }
        }
        Self::new(ckpt.architecture.clone(), params, tokenizer, section)
    }
}

/// Whether a parameter is one a LoRA checkpoint stores itself: an adapter or the head.
fn is_adapter_or_head(name: &str) -> bool {
    name.contains("_lora_") || name.split('.').next() == Some(HEAD)
}

/// The weights of the base encoder at `spec`, after checking that it is the one the adapters
/// were trained on.
fn read_base_weights(trained_on: &EncoderSource, spec: &Path) -> Result<ParamSet> {
    let needs = format!(
        "this checkpoint holds only LoRA adapters and a head, trained on the base encoder {} \
         (model.safetensors SHA-256 {})",
        trained_on.name, trained_on.sha256
    );
    // Loading records the SHA-256 of the base's weights (the folder's model.safetensors, or a
    // text model's checkpoint file).
    let base = TextEncoder::load(spec, candle_core::DType::F32).map_err(|e| {
        Error::Checkpoint(format!(
            "{needs}; reading that base failed: {e}; pass --encoder DIR|hf:NAME with it"
        ))
    })?;
    let found = &base.source().sha256;
    if found != &trained_on.sha256 {
        return Err(Error::Checkpoint(format!(
            "{needs}; the encoder at {} is a different model (SHA-256 {found}), so the adapters \
             do not apply to it: pass --encoder with the base they were trained on",
            spec.display()
        )));
    }
    Ok(base.params().clone())
}
