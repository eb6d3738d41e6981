//! Text: pre-trained sentence encoders read from Hugging Face / sentence-transformers folders
//! ([`pretrained`]), their tokenizers ([`tokenizer`]), and embedding sentences with them
//! ([`encoder`]). The encoder's layers are ordinary layers of `nn` (token embedding,
//! transformer blocks, pooling, normalisation), so models built on it train, freeze, save and
//! load like any other.

pub mod encoder;
pub mod hub;
pub mod pretrained;
pub mod section;
pub mod tokenizer;

pub use encoder::{Embeddings, TextEncoder};
pub use hub::{download_encoder, locate_encoder, HubName, HubOptions, HUB_PREFIX};
pub use pretrained::{file_sha256, load_pretrained, EncoderSource, PretrainedEncoder};
pub use section::{
    TextSection, TokenizerRecord, UnknownRule, HEAD, TEXT_SECTION, TOKENIZER_SECTION,
};
pub use tokenizer::{TextTokenizer, TokenBatch};
