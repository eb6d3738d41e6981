//! Pre-trained text encoders: reading the Hugging Face / sentence-transformers folder layout,
//! tokenisation, embeddings, and the errors for broken folders. A tiny random model in the same
//! layout runs everywhere; the shared all-MiniLM-L6-v2 is compared with sentence-transformers'
//! own output (`fixtures/text/minilm_reference.json`) when `../shared` is present.

mod common;

use std::path::Path;

use anyhow::{ensure, Result};
use candle_core::DType;

use common::hub_server::{snapshot_folder, HubServer};
use common::text_model::{shared_minilm, tiny_weights, write_tiny_encoder, HIDDEN, VOCAB};
use metalearn::text::{download_encoder, HubName, HubOptions, TextEncoder};

fn tiny(dir: &Path) -> TextEncoder {
    write_tiny_encoder(dir, 7, 12);
    TextEncoder::from_folder(dir, DType::F32).expect("the tiny encoder loads")
}

fn error_of(dir: &Path) -> String {
    TextEncoder::from_folder(dir, DType::F32)
        .expect_err("the folder is refused")
        .to_string()
}

#[test]
fn tiny_encoder_reads_pooling_normalisation_and_length() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let encoder = tiny(dir.path());
    let layers: Vec<&str> = encoder
        .network()
        .architecture()
        .layers
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    ensure!(
        layers == ["embeddings", "block1", "block2", "pool", "normalize"],
        "{layers:?}"
    );
    ensure!(encoder.dim() == HIDDEN);
    ensure!(encoder.tokenizer().max_length() == 12);
    ensure!(encoder.source().sha256.len() == 64);
    // The file pads to 128; the encoder pads a batch to its longest member.
    let batch = encoder
        .tokenizer()
        .encode_batch(&["what is my bank balance", "play music"])?;
    ensure!(batch.length == 7, "padded to {}", batch.length);
    ensure!(
        batch.ids[..7] == [2, 7, 8, 9, 10, 11, 3],
        "{:?}",
        &batch.ids[..7]
    );
    ensure!(
        batch.ids[7..] == [2, 14, 15, 3, 0, 0, 0],
        "{:?}",
        &batch.ids[7..]
    );
    // Word pieces and unknown words.
    let ids = encoder.tokenizer().token_ids("Songs zebra")?;
    ensure!(ids == [2, 32, 33, 1, 3], "{ids:?}");
    Ok(())
}

#[test]
fn embeddings_do_not_depend_on_batching_or_padding() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let encoder = tiny(dir.path());
    let texts = [
        "what is my bank balance",
        "play music",
        "how do i reset my router today ?",
        "a",
    ];
    let together = encoder.embed(&texts, 4)?;
    let (rows, dim) = together.vectors.dims2()?;
    ensure!(rows == 4 && dim == HIDDEN);
    let together = together.vectors.to_vec2::<f32>()?;
    for (i, text) in texts.iter().enumerate() {
        let alone = encoder.embed(&[text], 1)?.vectors.to_vec2::<f32>()?;
        let gap = alone[0]
            .iter()
            .zip(&together[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        ensure!(
            gap < 1e-5,
            "`{text}`: alone and in a padded batch differ by {gap}"
        );
        let norm: f32 = alone[0].iter().map(|v| v * v).sum::<f32>().sqrt();
        ensure!((norm - 1.0).abs() < 1e-5, "normalised, but norm {norm}");
    }
    // Distinct sentences get distinct embeddings.
    ensure!(together[0] != together[1]);
    Ok(())
}

#[test]
fn long_texts_are_truncated_and_counted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let encoder = tiny(dir.path());
    let long = "the ".repeat(40);
    let out = encoder.embed(&[long.as_str(), "play music"], 2)?;
    ensure!(out.truncated == 1, "truncated {}", out.truncated);
    ensure!(out.tokens == 12 + 4, "tokens {}", out.tokens);
    Ok(())
}

#[test]
fn a_folder_missing_a_file_names_it_and_lists_what_is_needed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_tiny_encoder(dir.path(), 7, 12);
    std::fs::remove_file(dir.path().join("tokenizer.json"))?;
    let e = error_of(dir.path());
    ensure!(e.contains("missing tokenizer.json"), "{e}");
    ensure!(
        e.contains("config.json, model.safetensors, tokenizer.json"),
        "{e}"
    );
    let e = error_of(&dir.path().join("nowhere"));
    ensure!(e.contains("no such model folder"), "{e}");
    Ok(())
}

#[test]
fn a_pytorch_only_folder_says_how_to_convert() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_tiny_encoder(dir.path(), 7, 12);
    std::fs::rename(
        dir.path().join("model.safetensors"),
        dir.path().join("pytorch_model.bin"),
    )?;
    let e = error_of(dir.path());
    ensure!(
        e.contains("pytorch_model.bin") && e.contains("safe_serialization=True"),
        "{e}"
    );
    Ok(())
}

#[test]
fn tensors_that_disagree_with_config_are_named_with_both_shapes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_tiny_encoder(dir.path(), 7, 12);
    let mut weights = tiny_weights(7);
    let bad = candle_core::Tensor::zeros((HIDDEN, 5), DType::F32, &candle_core::Device::Cpu)?;
    weights.insert("encoder.layer.1.attention.self.key.weight".into(), bad);
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors"))?;
    let e = error_of(dir.path());
    ensure!(
        e.contains("encoder.layer.1.attention.self.key.weight")
            && e.contains("[8, 5]")
            && e.contains("[8, 8]"),
        "{e}"
    );
    let mut weights = tiny_weights(7);
    weights.remove("encoder.layer.0.output.LayerNorm.bias");
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors"))?;
    let e = error_of(dir.path());
    ensure!(
        e.contains("`encoder.layer.0.output.LayerNorm.bias` is missing"),
        "{e}"
    );
    Ok(())
}

#[test]
fn a_tokenizer_larger_than_the_embedding_matrix_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_tiny_encoder(dir.path(), 7, 12);
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    config["vocab_size"] = serde_json::json!(30);
    std::fs::write(&path, config.to_string())?;
    let mut weights = tiny_weights(7);
    weights.insert(
        "embeddings.word_embeddings.weight".into(),
        candle_core::Tensor::zeros((30, HIDDEN), DType::F32, &candle_core::Device::Cpu)?,
    );
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors"))?;
    let e = error_of(dir.path());
    ensure!(
        e.contains(&format!("{} tokens", VOCAB.len())) && e.contains("30 rows"),
        "{e}"
    );
    Ok(())
}

#[test]
fn unsupported_models_are_refused_by_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_tiny_encoder(dir.path(), 7, 12);
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    config["model_type"] = serde_json::json!("roberta");
    std::fs::write(&path, config.to_string())?;
    let e = error_of(dir.path());
    ensure!(e.contains("model_type `roberta`"), "{e}");
    std::fs::write(&path, "{ not json")?;
    let e = error_of(dir.path());
    ensure!(e.contains("config.json: line 1"), "{e}");
    Ok(())
}

/// The shared all-MiniLM-L6-v2 against sentence-transformers: same token ids, embeddings
/// within 1e-5 (max abs) on 53 sentences (accents, CJK, emoji, one truncated at 256 tokens).
#[test]
fn minilm_matches_sentence_transformers() -> Result<()> {
    let Some(dir) = shared_minilm() else {
        eprintln!(
            "../shared/models/all-MiniLM-L6-v2 not found: the comparison with \
             sentence-transformers is skipped (the tiny model's tests ran)"
        );
        return Ok(());
    };
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text/minilm_reference.json"),
    )?)?;
    let sentences: Vec<&str> = fixture["sentences"]
        .as_array()
        .expect("sentences")
        .iter()
        .map(|s| s.as_str().expect("text"))
        .collect();
    ensure!(sentences.len() >= 50);
    let encoder = TextEncoder::from_folder(&dir, DType::F32)?;
    ensure!(
        encoder.tokenizer().max_length() == fixture["max_seq_length"].as_u64().unwrap() as usize
    );
    for (i, sentence) in sentences.iter().enumerate() {
        let ours = encoder.tokenizer().token_ids(sentence)?;
        let theirs: Vec<u32> = serde_json::from_value(fixture["token_ids"][i].clone())?;
        ensure!(
            ours == theirs,
            "token ids of {sentence:?}: {ours:?} vs {theirs:?}"
        );
    }
    let out = encoder.embed(&sentences, 8)?;
    ensure!(out.truncated == 1, "truncated {}", out.truncated);
    let ours = out.vectors.to_vec2::<f32>()?;
    let mut worst = 0f32;
    for (i, row) in ours.iter().enumerate() {
        let theirs: Vec<f32> = serde_json::from_value(fixture["embeddings"][i].clone())?;
        for (a, b) in row.iter().zip(&theirs) {
            worst = worst.max((a - b).abs());
        }
    }
    eprintln!("all-MiniLM-L6-v2: worst |metalearn − sentence-transformers| = {worst:.2e}");
    ensure!(worst < 1e-5, "embeddings differ by up to {worst}");
    Ok(())
}

/// The fused inference kernels (token embedding, encoder block) against the reference candle
/// path, on a padded batch of sentences of different lengths, one by one and in batches.
#[test]
fn fused_kernels_match_the_reference_path() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let encoder = tiny(dir.path());
    let texts = [
        "what is my bank balance ?",
        "play music",
        "how do i reset my router today",
        "a",
        "set an alarm for tomorrow , call mom",
    ];
    for batch in [1, 2, 5] {
        let fast = metalearn::kernels::with_kernels(true, || encoder.embed(&texts, batch))?;
        let reference = metalearn::kernels::with_kernels(false, || encoder.embed(&texts, batch))?;
        let gap = (fast.vectors - reference.vectors)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        ensure!(
            gap < 1e-5,
            "batch {batch}: fused and reference differ by {gap}"
        );
    }
    Ok(())
}

fn hub_options(endpoint: &str, cache: &Path, offline: bool) -> HubOptions {
    HubOptions {
        endpoint: Some(endpoint.to_string()),
        cache_dir: Some(cache.to_path_buf()),
        offline,
        token: None,
    }
}

fn hub_name(spec: &str) -> HubName {
    HubName::parse(spec)
        .expect("an hf: name")
        .expect("a valid name")
}

#[test]
fn hub_names_download_into_the_standard_cache_and_work_offline_afterwards() -> Result<()> {
    let model = tempfile::tempdir()?;
    let cache = tempfile::tempdir()?;
    let reference = tiny(model.path());
    let server = HubServer::start(model.path(), "tiny/encoder");
    let options = hub_options(&server.endpoint, cache.path(), false);
    let folder = download_encoder(&hub_name("hf:tiny/encoder"), &options)?;
    ensure!(
        folder == snapshot_folder(cache.path(), "tiny/encoder"),
        "the model lands in the hub cache layout: {}",
        folder.display()
    );
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ] {
        ensure!(folder.join(file).is_file(), "{file} was downloaded");
    }
    let texts = ["what is my bank balance", "play music"];
    let downloaded = TextEncoder::from_folder(&folder, DType::F32)?;
    ensure!(
        downloaded.embed(&texts, 2)?.vectors.to_vec2::<f32>()?
            == reference.embed(&texts, 2)?.vectors.to_vec2::<f32>()?,
        "the downloaded encoder is the served one"
    );
    let requests = server.served();
    drop(server);
    ensure!(requests > 0, "the files came from the server");

    // The server is gone: offline mode (and online mode, which finds every file in the cache
    // first) still load the model.
    let offline = hub_options("http://127.0.0.1:9", cache.path(), true);
    ensure!(download_encoder(&hub_name("hf:tiny/encoder"), &offline)? == folder);
    let cached = hub_options("http://127.0.0.1:9", cache.path(), false);
    ensure!(download_encoder(&hub_name("hf:tiny/encoder"), &cached)? == folder);

    // Offline with a model that is not in the cache says so.
    let message = download_encoder(&hub_name("hf:other/model"), &offline)
        .expect_err("not cached")
        .to_string();
    ensure!(
        message.contains("hf:other/model")
            && message.contains("HF_HUB_OFFLINE")
            && message.contains("config.json"),
        "{message}"
    );
    Ok(())
}

#[test]
fn hub_errors_name_the_model_the_file_and_what_to_do() -> Result<()> {
    let model = tempfile::tempdir()?;
    let cache = tempfile::tempdir()?;
    write_tiny_encoder(model.path(), 3, 12);
    let server = HubServer::start(model.path(), "tiny/encoder");
    let options = hub_options(&server.endpoint, cache.path(), false);

    let message = download_encoder(&hub_name("hf:nobody/nothing"), &options)
        .expect_err("no such model")
        .to_string();
    ensure!(
        message.contains("hf:nobody/nothing") && message.contains("config.json not found"),
        "{message}"
    );

    // A repository with PyTorch weights only.
    std::fs::rename(
        model.path().join("model.safetensors"),
        model.path().join("pytorch_model.bin"),
    )?;
    let message = download_encoder(&hub_name("hf:tiny/encoder@v1"), &options)
        .expect_err("no safetensors")
        .to_string();
    ensure!(
        message.contains("hf:tiny/encoder@v1")
            && message.contains("model.safetensors")
            && message.contains("pytorch_model.bin"),
        "{message}"
    );
    drop(server);

    // Nothing listens: the error says the Hub could not be reached and what to do.
    let unreachable = hub_options("http://127.0.0.1:9", cache.path(), false);
    let message = download_encoder(&hub_name("hf:nobody/else"), &unreachable)
        .expect_err("no server")
        .to_string();
    ensure!(
        message.contains("could not be reached") && message.contains("HF_HUB_OFFLINE"),
        "{message}"
    );

    for bad in ["hf:", "hf:a/b/c", "hf:a b", "hf:owner/model@"] {
        let message = HubName::parse(bad)
            .expect("an hf: name")
            .expect_err("malformed")
            .to_string();
        ensure!(message.contains("hf:OWNER/MODEL"), "{bad}: {message}");
    }
    ensure!(
        HubName::parse("some/folder").is_none(),
        "a folder is not a Hub name"
    );
    Ok(())
}

#[test]
fn a_weights_file_given_as_the_encoder_says_to_give_the_folder() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_tiny_encoder(dir.path(), 5, 12);
    let message = TextEncoder::load(&dir.path().join("model.safetensors"), DType::F32)
        .expect_err("a weights file is not an encoder")
        .to_string();
    ensure!(
        message.contains("model.safetensors") && message.contains("give the folder"),
        "{message}"
    );
    Ok(())
}
