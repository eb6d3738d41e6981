//! The `text` section of a text model's checkpoint: the tokenizer, the encoder it was built on,
//! the classes and the out-of-scope rule. Everything that reads a text checkpoint (the
//! classifier, an encoder taken from a fine-tuned classifier) reads this. A meta-trained text
//! model has no classes; its checkpoint holds only the tokenizer part, in a `tokenizer`
//! section, so that `adapt` and `meta-eval` need nothing but the checkpoint.

use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::text::pretrained::EncoderSource;
use crate::text::tokenizer::TextTokenizer;

/// Layer name of a text model's classification head (every layer before it is the encoder).
pub const HEAD: &str = "head";

/// Name of the checkpoint section that holds the text side of a model.
pub const TEXT_SECTION: &str = "text";

/// Name of the checkpoint section that holds a meta-trained text model's tokenizer.
pub const TOKENIZER_SECTION: &str = "tokenizer";

/// The tokenizer a text model reads with and the encoder it was built on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerRecord {
    /// The tokenizer.json text.
    pub tokenizer: String,
    /// The longest sequence the model reads.
    pub max_length: usize,
    /// The padding token id.
    pub pad_id: u32,
    /// The encoder the model was built on.
    pub encoder: EncoderSource,
}

impl TokenizerRecord {
    /// The `tokenizer` section of a meta-trained text model's checkpoint; `None` when it has
    /// none (not a text model, or written before the section existed).
    pub fn of(ckpt: &Checkpoint) -> Result<Option<Self>> {
        ckpt.parsed_section(TOKENIZER_SECTION)
    }

    /// The stored tokenizer.
    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        TextTokenizer::from_json(&self.tokenizer, self.max_length, self.pad_id)
    }
}

/// How queries outside the known classes are answered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnknownRule {
    /// The label answered (`oos` in CLINC150).
    pub label: String,
    /// A query whose top class probability is below this is answered with `label`.
    pub threshold: f64,
}

/// The checkpoint's `text` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TextSection {
    /// The tokenizer and the encoder the model was built on (stored as fields of this section).
    #[serde(flatten)]
    pub base: TokenizerRecord,
    /// Class names by class id.
    pub classes: Vec<String>,
    /// The out-of-scope rule, when the model has one.
    #[serde(default)]
    pub unknown: Option<UnknownRule>,
    /// The transfer method that trained it.
    pub method: String,
    /// The CSV column the texts were read from.
    pub text_column: String,
    /// The CSV column the labels were read from.
    pub label_column: String,
    /// The checkpoint holds only what training changed (LoRA adapters and the head); the
    /// encoder's weights are read from the base encoder, which must be the one of `encoder`
    /// (same SHA-256).
    #[serde(default)]
    pub adapters_only: bool,
}

impl TextSection {
    /// The `text` section of a checkpoint; `None` when it holds no text model.
    pub fn of(ckpt: &Checkpoint) -> Result<Option<Self>> {
        ckpt.parsed_section(TEXT_SECTION)
    }

    /// The stored tokenizer.
    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        self.base.tokenizer()
    }
}
