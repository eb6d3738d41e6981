//! A tiny random BERT sentence encoder in the Hugging Face / sentence-transformers folder
//! layout (config.json, model.safetensors with BERT's tensor names, a WordPiece tokenizer.json,
//! modules.json, 1_Pooling/config.json, sentence_bert_config.json), for tests that must run
//! without the shared pre-trained model.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The tiny model's vocabulary: special tokens first, then words and word pieces.
pub const VOCAB: &[&str] = &[
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "what", "is", "my", "bank",
    "balance", "book", "table", "play", "music", "how", "do", "i", "reset", "router", "card",
    "credit", "weather", "today", "tomorrow", "set", "alarm", "for", "to", "call", "mom", "song",
    "##s", "##ing", "##ed", "?", "!", ",", ".", "'", "freeze", "cancel", "order", "pizza",
    "lights", "turn", "off", "on", "in",
];

/// Sizes of the tiny model.
pub const HIDDEN: usize = 8;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 2;
pub const INTERMEDIATE: usize = 16;
pub const POSITIONS: usize = 16;

/// The `tokenizer.json` of the tiny model (BERT normaliser and pre-tokeniser, WordPiece,
/// `[CLS] … [SEP]`, and the fixed padding to 128 that the published MiniLM file also has).
pub fn tokenizer_json() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = VOCAB
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = VOCAB[..5]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 128, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": null,
            "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
            "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                               "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": vocab}
    })
}

/// Writes the tiny encoder into `dir` (created if needed); `max_seq_length` goes into
/// sentence_bert_config.json.
pub fn write_tiny_encoder(dir: &Path, seed: u64, max_seq_length: usize) {
    std::fs::create_dir_all(dir.join("1_Pooling")).expect("folder");
    let config = serde_json::json!({
        "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
        "vocab_size": VOCAB.len(), "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": POSITIONS, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "pad_token_id": 0, "position_embedding_type": "absolute"
    });
    let write = |name: &str, value: &serde_json::Value| {
        std::fs::write(
            dir.join(name),
            serde_json::to_string_pretty(value).expect("json"),
        )
        .expect("write")
    };
    write("config.json", &config);
    write("tokenizer.json", &tokenizer_json());
    write(
        "modules.json",
        &serde_json::json!([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        ]),
    );
    write(
        "1_Pooling/config.json",
        &serde_json::json!({"word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": false,
            "pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": false,
            "pooling_mode_mean_sqrt_len_tokens": false}),
    );
    write(
        "sentence_bert_config.json",
        &serde_json::json!({"max_seq_length": max_seq_length, "do_lower_case": false}),
    );
    candle_core::safetensors::save(&tiny_weights(seed), dir.join("model.safetensors"))
        .expect("safetensors");
}

/// Random weights under BERT's tensor names, in PyTorch's `[out, in]` layout.
pub fn tiny_weights(seed: u64) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensor = |shape: &[usize], centre: f32, spread: f32| {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| centre + spread * rng.gen_range(-1.0f32..1.0))
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor")
    };
    let mut w = HashMap::new();
    let v = VOCAB.len();
    w.insert(
        "embeddings.word_embeddings.weight".into(),
        tensor(&[v, HIDDEN], 0.0, 0.5),
    );
    w.insert(
        "embeddings.position_embeddings.weight".into(),
        tensor(&[POSITIONS, HIDDEN], 0.0, 0.1),
    );
    w.insert(
        "embeddings.token_type_embeddings.weight".into(),
        tensor(&[2, HIDDEN], 0.0, 0.1),
    );
    w.insert(
        "embeddings.LayerNorm.weight".into(),
        tensor(&[HIDDEN], 1.0, 0.1),
    );
    w.insert(
        "embeddings.LayerNorm.bias".into(),
        tensor(&[HIDDEN], 0.0, 0.1),
    );
    // BERT checkpoints also hold position ids and a pooler, which the encoder does not read.
    w.insert(
        "embeddings.position_ids".into(),
        Tensor::arange(0i64, POSITIONS as i64, &Device::Cpu)
            .expect("ids")
            .unsqueeze(0)
            .expect("2-D"),
    );
    w.insert(
        "pooler.dense.weight".into(),
        tensor(&[HIDDEN, HIDDEN], 0.0, 0.3),
    );
    w.insert("pooler.dense.bias".into(), tensor(&[HIDDEN], 0.0, 0.1));
    for i in 0..LAYERS {
        let p = format!("encoder.layer.{i}");
        for (name, out, inp) in [
            ("attention.self.query", HIDDEN, HIDDEN),
            ("attention.self.key", HIDDEN, HIDDEN),
            ("attention.self.value", HIDDEN, HIDDEN),
            ("attention.output.dense", HIDDEN, HIDDEN),
            ("intermediate.dense", INTERMEDIATE, HIDDEN),
            ("output.dense", HIDDEN, INTERMEDIATE),
        ] {
            w.insert(format!("{p}.{name}.weight"), tensor(&[out, inp], 0.0, 0.4));
            w.insert(format!("{p}.{name}.bias"), tensor(&[out], 0.0, 0.1));
        }
        for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
            w.insert(format!("{p}.{name}.weight"), tensor(&[HIDDEN], 1.0, 0.1));
            w.insert(format!("{p}.{name}.bias"), tensor(&[HIDDEN], 0.0, 0.1));
        }
    }
    w
}

/// The shared all-MiniLM-L6-v2 folder, when it is beside the repository.
pub fn shared_minilm() -> Option<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/all-MiniLM-L6-v2");
    dir.join("model.safetensors").is_file().then_some(dir)
}
