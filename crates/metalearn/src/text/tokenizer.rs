//! Tokenisation of text batches through the `tokenizers` crate (the Hugging Face
//! `tokenizer.json` format): each batch is padded to its longest member, and sequences longer
//! than the model reads are truncated and counted.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::error::{Error, Result};

/// A tokenizer with the padding and truncation a model needs.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The `tokenizer.json` text, kept so that a checkpoint can carry the tokenizer.
    json: String,
    max_length: usize,
    pad_id: u32,
}

/// One tokenised batch: ids `[batch, length]` padded with the pad id.
#[derive(Clone, Debug)]
pub struct TokenBatch {
    /// Token ids, row-major, `rows × length`.
    pub ids: Vec<u32>,
    /// Number of sequences.
    pub rows: usize,
    /// Length of the longest sequence (every row is padded to it).
    pub length: usize,
    /// How many sequences were cut at the maximum length.
    pub truncated: usize,
}

impl TokenBatch {
    /// The ids as a `[rows, length]` tensor of `dtype` (the network reads ids as numbers of its
    /// float type).
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let values: Vec<f32> = self.ids.iter().map(|&id| id as f32).collect();
        Ok(Tensor::from_vec(values, (self.rows, self.length), device)?.to_dtype(dtype)?)
    }
}

impl TextTokenizer {
    /// Reads a `tokenizer.json` file. `max_length` is the longest sequence the model reads
    /// (special tokens included); `pad_id` its padding token.
    pub fn from_file(path: &Path, max_length: usize, pad_id: u32) -> Result<Self> {
        let json = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&json, max_length, pad_id)
            .map_err(|e| Error::Data(format!("{}: {e}", path.display())))
    }

    /// Builds the tokenizer from the text of a `tokenizer.json` file.
    pub fn from_json(json: &str, max_length: usize, pad_id: u32) -> Result<Self> {
        let mut inner: Tokenizer = json
            .parse()
            .map_err(|e| Error::Data(format!("not a valid tokenizer.json: {e}")))?;
        if max_length == 0 {
            return Err(Error::Config("a tokenizer needs max_length > 0".into()));
        }
        // The file's own padding (all-MiniLM-L6-v2 pads every input to 128) is replaced by
        // padding to the batch's longest member, as sentence-transformers does.
        let pad_token = inner
            .get_padding()
            .map(|p| p.pad_token.clone())
            .or_else(|| inner.id_to_token(pad_id))
            .unwrap_or_else(|| "[PAD]".into());
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::Config(format!("cannot set truncation: {e}")))?;
        Ok(Self {
            inner,
            json: json.to_string(),
            max_length,
            pad_id,
        })
    }

    /// The `tokenizer.json` text this tokenizer was built from.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The longest sequence (in tokens, special tokens included) a batch may hold.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The padding token id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The largest token id the tokenizer can produce.
    pub fn max_token_id(&self) -> Option<u32> {
        self.inner.get_vocab(true).values().copied().max()
    }

    /// The ids of one text, with special tokens, not padded.
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| Error::Data(format!("cannot tokenise {text:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Tokenises texts one by one (not padded), returning their ids and how many were cut at
    /// the maximum length.
    pub fn encode_each(&self, texts: &[&str]) -> Result<(Vec<Vec<u32>>, usize)> {
        if texts.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let encodings = if texts.len() == 1 {
            // One text: no batch padding, and no parallel loop to start.
            vec![self
                .inner
                .encode_fast(texts[0], true)
                .map_err(|e| Error::Data(format!("cannot tokenise {:?}: {e}", texts[0])))?]
        } else {
            self.inner
                .encode_batch_fast(texts.to_vec(), true)
                .map_err(|e| Error::Data(format!("cannot tokenise a batch: {e}")))?
        };
        let mut truncated = 0;
        let sequences = encodings
            .iter()
            .map(|encoding| {
                if !encoding.get_overflowing().is_empty() {
                    truncated += 1;
                }
                let tokens = encoding
                    .get_attention_mask()
                    .iter()
                    .filter(|&&m| m == 1)
                    .count();
                encoding.get_ids()[..tokens].to_vec()
            })
            .collect();
        Ok((sequences, truncated))
    }

    /// Tokenises a batch of texts, padded to its longest member.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<TokenBatch> {
        let (sequences, truncated) = self.encode_each(texts)?;
        let refs: Vec<&[u32]> = sequences.iter().map(|s| s.as_slice()).collect();
        let mut batch = self.pad(&refs);
        batch.truncated = truncated;
        Ok(batch)
    }

    /// Pads token sequences to the longest of them.
    pub fn pad(&self, sequences: &[&[u32]]) -> TokenBatch {
        let length = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(sequences.len() * length);
        for sequence in sequences {
            ids.extend_from_slice(sequence);
            ids.extend(std::iter::repeat_n(self.pad_id, length - sequence.len()));
        }
        TokenBatch {
            ids,
            rows: sequences.len(),
            length,
            truncated: 0,
        }
    }
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}
