//! Text commands end to end on a tiny random BERT in the Hugging Face layout: `train --encoder`
//! by every method, `evaluate` and `predict` of the self-contained checkpoint (the encoder
//! folder deleted first), out-of-scope rejection, `embed`, and the errors for bad input.

mod common;

use std::path::Path;

use common::cli::{last_json, metalearn_in, run_err_in, run_ok_in};
use common::hub_server::{snapshot_folder, HubServer};
use common::text_model::write_tiny_encoder;

/// Three intents written with the tiny vocabulary, plus out-of-scope rows.
const ROWS: &[(&str, &str)] = &[
    ("what is my bank balance", "balance"),
    ("my bank balance", "balance"),
    ("what is the balance", "balance"),
    ("balance of my bank", "balance"),
    ("is my balance today", "balance"),
    ("play music", "music"),
    ("play a song", "music"),
    ("play the songs", "music"),
    ("music on", "music"),
    ("play music today", "music"),
    ("set alarm for tomorrow", "alarm"),
    ("set an alarm", "alarm"),
    ("alarm for today", "alarm"),
    ("set the alarm", "alarm"),
    ("alarm tomorrow", "alarm"),
    ("order pizza", "oos"),
    ("freeze my credit card", "oos"),
    ("turn off lights", "oos"),
];

fn write_csv(path: &Path, rows: &[(&str, &str)]) {
    let mut text = String::from("text,intent\n");
    for (t, l) in rows {
        text.push_str(&format!("{t},{l}\n"));
    }
    std::fs::write(path, text).unwrap();
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_encoder(&dir.path().join("encoder"), 3, 16);
        write_csv(&dir.path().join("train.csv"), ROWS);
        write_csv(&dir.path().join("val.csv"), ROWS);
        Self { dir }
    }
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
    /// `train --encoder` on the tiny model and train.csv, writing `out`, with `extra` flags.
    fn train_args(&self, out: &str, extra: &[&str]) -> Vec<String> {
        let (encoder, data) = (self.path("encoder"), self.path("train.csv"));
        let head = [
            "train",
            "--encoder",
            &encoder,
            "--data",
            &data,
            "--text-column",
            "text",
            "--target",
            "intent",
            "--out",
            out,
        ];
        owned(&[&head[..], extra].concat())
    }
    fn train(&self, out: &str, extra: &[&str]) -> serde_json::Value {
        let mut args = self.train_args(out, extra);
        args.push("--json".into());
        last_json(&run_ok_in(&as_refs(&args), None))
    }
}

#[test]
fn linear_probe_trains_evaluates_and_predicts_without_the_encoder_folder() {
    let s = Setup::new();
    let model = s.path("probe.safetensors");
    let report = s.train(
        &model,
        &[
            "--unknown-label",
            "oos",
            "--validation-data",
            &s.path("val.csv"),
        ],
    );
    assert_eq!(report["train"]["classes"], 3);
    assert_eq!(report["train"]["rows"], 15, "oos rows are not a class");
    assert!(report["threshold"].as_f64().is_some());
    // The checkpoint carries the tokenizer and the encoder's weights.
    std::fs::remove_dir_all(s.dir.path().join("encoder")).unwrap();
    let eval = last_json(&run_ok_in(
        &[
            "evaluate",
            "--model",
            &model,
            "--data",
            &s.path("val.csv"),
            "--json",
        ],
        None,
    ));
    let closed = eval["closed_accuracy"].as_f64().unwrap();
    assert!(
        closed >= 0.8,
        "a linear probe fits 15 training rows: {closed}"
    );
    for key in ["accuracy", "in_scope_accuracy", "oos_recall"] {
        assert!(
            eval[key].as_f64().is_some(),
            "evaluate reports {key}: {eval}"
        );
    }
    let out = s.path("pred.csv");
    run_ok_in(
        &[
            "predict",
            "--model",
            &model,
            "--data",
            &s.path("val.csv"),
            "--out",
            &out,
        ],
        None,
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "prediction,confidence,best_class");
    assert_eq!(lines.len(), ROWS.len() + 1);
    assert!(lines[1..].iter().any(|l| l.starts_with("balance,")));
}

#[test]
fn prototype_needs_no_training_and_finetune_lowers_the_loss() {
    let s = Setup::new();
    let proto = s.train(&s.path("proto.safetensors"), &["--method", "prototype"]);
    assert!(proto["train"]["epoch_losses"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(proto["train"]["label_examples"], 0);
    let labelled = s.train(
        &s.path("labelled.safetensors"),
        &["--method", "prototype", "--labels-as-examples"],
    );
    assert_eq!(labelled["train"]["label_examples"], 4, "{labelled}");
    assert_eq!(labelled["train"]["rows"], ROWS.len());
    let tuned = s.train(
        &s.path("tuned.safetensors"),
        &[
            "--method",
            "finetune",
            "--epochs",
            "3",
            "--lr",
            "1e-3",
            "--batch-size",
            "4",
        ],
    );
    let losses: Vec<f64> = epoch_losses(&tuned);
    assert_eq!(losses.len(), 3);
    assert!(
        losses[2] < losses[0],
        "fine-tuning lowers the loss: {losses:?}"
    );
    let top = s.train(
        &s.path("top.safetensors"),
        &["--method", "finetune", "--top-layers", "1", "--epochs", "1"],
    );
    let all = tuned["train"]["trained_parameters"].as_u64().unwrap();
    let one = top["train"]["trained_parameters"].as_u64().unwrap();
    assert!(one < all, "top-1 trains fewer weights: {one} vs {all}");
}

#[test]
fn a_contrastive_weight_adds_to_the_loss_and_training_lowers_it() {
    let s = Setup::new();
    let run = |out: &str, weight: &str| {
        let report = s.train(
            &s.path(out),
            &[
                "--epochs",
                "3",
                "--lr",
                "1e-3",
                "--batch-size",
                "4",
                "--contrastive-weight",
                weight,
            ],
        );
        epoch_losses(&report)
    };
    let plain = run("plain.safetensors", "0");
    let contrastive = run("contrastive.safetensors", "0.5");
    assert!(
        contrastive[0] > plain[0],
        "the contrastive term adds to the first epoch's loss: {contrastive:?} vs {plain:?}"
    );
    assert!(
        contrastive[2] < contrastive[0],
        "training lowers the sum: {contrastive:?}"
    );
    let err = run_err_in(
        &as_refs(&s.train_args(
            &s.path("bad.safetensors"),
            &["--method", "prototype", "--contrastive-weight", "0.5"],
        )),
        None,
    );
    assert!(
        err.contains("--contrastive-weight does not apply to --method prototype"),
        "{err}"
    );
}

/// The mean training loss of each epoch in a `train --json` report.
fn epoch_losses(report: &serde_json::Value) -> Vec<f64> {
    report["train"]["epoch_losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn as_refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A command line as owned strings.
fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[test]
fn lora_trains_only_adapters_and_head() {
    let s = Setup::new();
    let report = s.train(
        &s.path("lora.safetensors"),
        &[
            "--method",
            "lora",
            "--lora-rank",
            "2",
            "--epochs",
            "2",
            "--batch-size",
            "4",
        ],
    );
    // 2 blocks × (q, v) × (8×2 + 2×8) adapter values + a head of 4 classes, 8×4 + 4.
    assert_eq!(report["train"]["trained_parameters"], 2 * 2 * 32 + 36);
    let inspect = run_ok_in(&["inspect", &s.path("lora.safetensors")], None);
    assert!(inspect.contains("LoRA rank 2"), "{inspect}");
    assert!(inspect.contains("read from the base encoder"), "{inspect}");

    // The file holds the adapters and head only: smaller than the encoder's weights.
    let file = std::fs::metadata(s.path("lora.safetensors")).unwrap().len();
    let base = std::fs::metadata(s.dir.path().join("encoder/model.safetensors"))
        .unwrap()
        .len();
    assert!(file < base, "{file} bytes vs the base's {base}");

    let predict = |extra: &[&str]| {
        let (model, data, out) = (
            s.path("lora.safetensors"),
            s.path("val.csv"),
            s.path("pred.csv"),
        );
        let head = ["predict", "--model", &model, "--data", &data, "--out", &out];
        owned(&[&head[..], extra].concat())
    };
    run_ok_in(&as_refs(&predict(&[])), None);
    let before = std::fs::read_to_string(s.path("pred.csv")).unwrap();

    // The base moved: the error says which base is needed and how to pass it.
    std::fs::rename(s.dir.path().join("encoder"), s.dir.path().join("moved")).unwrap();
    let err = run_err_in(&as_refs(&predict(&[])), None);
    assert!(
        err.contains("only LoRA adapters") && err.contains("--encoder") && err.contains("SHA-256"),
        "{err}"
    );
    run_ok_in(&as_refs(&predict(&["--encoder", &s.path("moved")])), None);
    assert_eq!(std::fs::read_to_string(s.path("pred.csv")).unwrap(), before);

    // Another encoder with the same shapes is refused by its SHA-256.
    write_tiny_encoder(&s.dir.path().join("other"), 99, 16);
    let err = run_err_in(&as_refs(&predict(&["--encoder", &s.path("other")])), None);
    assert!(err.contains("a different model"), "{err}");

    // Commands that need a self-contained model say what the file is.
    let err = run_err_in(
        &[
            "export-keras",
            &s.path("lora.safetensors"),
            "--out",
            &s.path("lora.keras"),
        ],
        None,
    );
    assert!(err.contains("LoRA checkpoint"), "{err}");
}

#[test]
fn finetune_continues_from_a_text_model_on_new_classes() {
    let s = Setup::new();
    s.train(&s.path("first.safetensors"), &["--method", "linear-probe"]);
    let mut csv = String::from("text,intent\n");
    for (text, intent, _) in DOMAIN_ROWS {
        csv.push_str(&format!("{text},{intent}\n"));
    }
    std::fs::write(s.dir.path().join("new.csv"), csv).unwrap();
    let report = last_json(&run_ok_in(
        &[
            "finetune",
            "--from",
            &s.path("first.safetensors"),
            "--data",
            &s.path("new.csv"),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--labels-as-examples",
            "--out",
            &s.path("second.safetensors"),
            "--json",
        ],
        None,
    ));
    assert_eq!(report["command"], "finetune");
    assert_eq!(report["train"]["classes"], 8, "{report}");
    assert_eq!(report["train"]["label_examples"], 8, "{report}");
    let inspect = run_ok_in(&["inspect", &s.path("second.safetensors")], None);
    assert!(
        inspect.contains("first.safetensors"),
        "the encoder is recorded: {inspect}"
    );
    let err = run_err_in(
        &[
            "finetune",
            "--from",
            &s.path("first.safetensors"),
            "--data",
            &s.path("new.csv"),
            "--freeze",
            "block1",
            "--out",
            &s.path("third.safetensors"),
        ],
        None,
    );
    assert!(
        err.contains("--freeze does not apply to text models"),
        "{err}"
    );
}

#[test]
fn setfit_trains_the_encoder_on_pairs_then_fits_a_head() {
    let s = Setup::new();
    let report = s.train(
        &s.path("setfit.safetensors"),
        &["--method", "setfit", "--epochs", "3", "--batch-size", "16"],
    );
    assert_eq!(report["train"]["method"], "setfit");
    let losses: Vec<f64> = epoch_losses(&report);
    assert_eq!(losses.len(), 3, "{report}");
    assert!(losses[2] < losses[0], "the pair loss falls: {losses:?}");
    // The encoder (all but its word table) and a 4-class head of 8 inputs were trained.
    assert!(report["train"]["trained_parameters"].as_u64().unwrap() > 36);
    let capped = s.train(
        &s.path("capped.safetensors"),
        &["--method", "setfit", "--max-steps", "2"],
    );
    assert_eq!(capped["train"]["epoch_losses"].as_array().unwrap().len(), 1);
    let args = s.train_args(
        &s.path("x.safetensors"),
        &["--method", "prototype", "--max-steps", "3"],
    );
    let err = run_err_in(&as_refs(&args), None);
    assert!(
        err.contains("--max-steps does not apply to --method prototype"),
        "{err}"
    );
}

#[test]
fn few_shot_draws_are_seeded_and_per_class() {
    let s = Setup::new();
    let a = s.train(
        &s.path("a.safetensors"),
        &["--shots-per-class", "2", "--seed", "4"],
    );
    let b = s.train(
        &s.path("b.safetensors"),
        &["--shots-per-class", "2", "--seed", "4"],
    );
    let c = s.train(
        &s.path("c.safetensors"),
        &["--shots-per-class", "2", "--seed", "5"],
    );
    assert_eq!(
        a["train"]["rows"], 8,
        "2 rows of each of the 4 labels (no --unknown-label)"
    );
    assert_eq!(a["drawn_rows"], b["drawn_rows"]);
    assert_ne!(a["drawn_rows"], c["drawn_rows"]);
    let err = run_err_in(
        &[
            "train",
            "--encoder",
            &s.path("encoder"),
            "--data",
            &s.path("train.csv"),
            "--text-column",
            "text",
            "--target",
            "intent",
            "--shots-per-class",
            "9",
            "--out",
            &s.path("x.safetensors"),
        ],
        None,
    );
    assert!(err.contains("fewer than --shots-per-class 9"), "{err}");
}

#[test]
fn embed_writes_safetensors_and_csv() {
    let s = Setup::new();
    let out = s.path("emb.safetensors");
    let report = last_json(&run_ok_in(
        &[
            "embed",
            "--encoder",
            &s.path("encoder"),
            "--data",
            &s.path("train.csv"),
            "--text-column",
            "text",
            "--out",
            &out,
            "--json",
        ],
        None,
    ));
    assert_eq!(report["rows"], ROWS.len());
    assert_eq!(report["dim"], 8);
    let tensors = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(tensors["embeddings"].dims(), [ROWS.len(), 8]);
    let csv_out = s.path("emb.csv");
    run_ok_in(
        &[
            "embed",
            "--encoder",
            &s.path("encoder"),
            "--data",
            &s.path("train.csv"),
            "--text-column",
            "text",
            "--out",
            &csv_out,
        ],
        None,
    );
    let text = std::fs::read_to_string(&csv_out).unwrap();
    assert_eq!(text.lines().count(), ROWS.len() + 1);
    assert!(text.starts_with("dim_0,dim_1,"));
}

#[test]
fn bad_text_input_is_named() {
    let s = Setup::new();
    let base = |column: &str, data: &str| {
        vec![
            "train".to_string(),
            "--encoder".into(),
            s.path("encoder"),
            "--data".into(),
            data.to_string(),
            "--text-column".into(),
            column.to_string(),
            "--target".into(),
            "intent".into(),
            "--out".into(),
            s.path("bad.safetensors"),
        ]
    };
    let run = |args: Vec<String>| run_err_in(&as_refs(&args), None);
    let err = run(base("txt", &s.path("train.csv")));
    assert!(
        err.contains("text column `txt` not found") && err.contains("did you mean `text`"),
        "{err}"
    );
    std::fs::write(
        s.dir.path().join("empty.csv"),
        "text,intent\nplay music,music\n,music\n",
    )
    .unwrap();
    let err = run(base("text", &s.path("empty.csv")));
    assert!(err.contains("line 3") && err.contains("empty"), "{err}");
    std::fs::write(
        s.dir.path().join("utf8.csv"),
        b"text,intent\nplay \xff music,music\n",
    )
    .unwrap();
    let err = run(base("text", &s.path("utf8.csv")));
    assert!(err.contains("line 2") && err.contains("UTF-8"), "{err}");
    let mut args = base("text", &s.path("train.csv"));
    args.extend(["--unknown-label".into(), "oos".into()]);
    let err = run(args);
    assert!(err.contains("--validation-data"), "{err}");
    let mut args = base("text", &s.path("train.csv"));
    args.extend(["--method".into(), "protoype".into()]);
    let err = run(args);
    assert!(err.contains("did you mean \"prototype\""), "{err}");
    // `train` on the texts without --encoder, with `flags`.
    let without_encoder = |flags: &[&str]| {
        let (data, out) = (s.path("train.csv"), s.path("bad.safetensors"));
        let head = ["train", "--data", &data, "--target", "intent"];
        owned(&[&head[..], flags, &["--out", &out]].concat())
    };
    let err = run(without_encoder(&["--labels-as-examples"]));
    assert!(
        err.contains("--labels-as-examples applies to text models"),
        "{err}"
    );
    assert!(
        !s.dir.path().join("bad.safetensors").exists(),
        "nothing written"
    );
    let out = metalearn_in(&as_refs(&without_encoder(&["--text-column", "text"])), None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("add --encoder DIR"));
}

#[test]
fn an_hf_name_downloads_through_hf_endpoint_into_hf_home() {
    let s = Setup::new();
    let server = HubServer::start(&s.dir.path().join("encoder"), "tiny/encoder");
    let home = s.dir.path().join("hf-home");
    let endpoint = server.endpoint.clone();
    let embed = |offline: bool, out: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_metalearn"))
            .args(["embed", "--encoder", "hf:tiny/encoder", "--data"])
            .arg(s.path("train.csv"))
            .args(["--text-column", "text", "--out", out, "--json"])
            .env("RAYON_NUM_THREADS", "1")
            .env("HF_ENDPOINT", &endpoint)
            .env("HF_HOME", &home)
            .env("HF_HUB_OFFLINE", if offline { "1" } else { "0" })
            .env_remove("HF_HUB_CACHE")
            .output()
            .expect("the metalearn binary runs")
    };
    let online = embed(false, &s.path("online.csv"));
    assert!(
        online.status.success(),
        "{}",
        String::from_utf8_lossy(&online.stderr)
    );
    assert!(
        snapshot_folder(&home.join("hub"), "tiny/encoder")
            .join("model.safetensors")
            .is_file(),
        "downloaded into $HF_HOME/hub"
    );
    drop(server);
    let offline = embed(true, &s.path("offline.csv"));
    assert!(
        offline.status.success(),
        "{}",
        String::from_utf8_lossy(&offline.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(s.path("online.csv")).unwrap(),
        std::fs::read_to_string(s.path("offline.csv")).unwrap(),
        "the cached model gives the same embeddings"
    );
}

/// Eight intents in four domains, written with the tiny vocabulary.
const DOMAIN_ROWS: &[(&str, &str, &str)] = &[
    ("what is my bank balance", "balance", "bank"),
    ("my balance", "balance", "bank"),
    ("balance today", "balance", "bank"),
    ("bank balance", "balance", "bank"),
    ("freeze my credit card", "card", "bank"),
    ("credit card", "card", "bank"),
    ("cancel my card", "card", "bank"),
    ("freeze card", "card", "bank"),
    ("play music", "music", "home"),
    ("play a song", "music", "home"),
    ("play the songs", "music", "home"),
    ("music on", "music", "home"),
    ("turn off lights", "lights", "home"),
    ("lights on", "lights", "home"),
    ("turn on the lights", "lights", "home"),
    ("lights off", "lights", "home"),
    ("set alarm for tomorrow", "alarm", "time"),
    ("set an alarm", "alarm", "time"),
    ("alarm for today", "alarm", "time"),
    ("set the alarm", "alarm", "time"),
    ("weather today", "weather", "time"),
    ("weather tomorrow", "weather", "time"),
    ("what is the weather", "weather", "time"),
    ("how is the weather", "weather", "time"),
    ("order pizza", "pizza", "food"),
    ("order a pizza", "pizza", "food"),
    ("pizza today", "pizza", "food"),
    ("pizza", "pizza", "food"),
    ("call mom", "call", "food"),
    ("call my mom", "call", "food"),
    ("to call mom", "call", "food"),
    ("call", "call", "food"),
];

fn text_meta_config(algorithm: &str, iterations: usize) -> String {
    format!(
        r#"
[task]
kind = "classification"
data = "domains.csv"
text_column = "text"
target = "intent"
group_column = "domain"
split_groups = {{ train = ["bank", "home"], validation = ["time"], test = ["food"] }}
same_group = true
ways = 2
shots = 1
queries = 2

[model]
arch = "encoder"
encoder = "encoder"

[algorithm]
name = "{algorithm}"
inner_lr = 0.1
inner_steps = 1
eval_inner_steps = 2
first_order = true

[training]
iterations = {iterations}
meta_batch = 2
outer_lr = 0.01
validate_every = {iterations}
validation_tasks = 4
checkpoint_every = {iterations}
seed = 1

[eval]
episodes = 8
"#
    )
}

#[test]
fn meta_learning_runs_on_texts_with_a_pre_trained_encoder() {
    let s = Setup::new();
    let mut csv = String::from("text,intent,domain\n");
    for (text, intent, domain) in DOMAIN_ROWS {
        csv.push_str(&format!("{text},{intent},{domain}\n"));
    }
    std::fs::write(s.dir.path().join("domains.csv"), csv).unwrap();
    let dir = Some(s.dir.path());

    // ProtoNet: the encoder's own prototypes before meta-training, then after.
    std::fs::write(
        s.dir.path().join("protonet.toml"),
        text_meta_config("protonet", 40)
            .replace("first_order = true\n", "")
            .replace("validate_every = 40", "validate_every = 5"),
    )
    .unwrap();
    let before = last_json(&run_ok_in(
        &["meta-eval", "--config", "protonet.toml", "--json"],
        dir,
    ));
    assert!(before["mean"].as_f64().unwrap() > 0.0, "{before}");
    let trained = last_json(&run_ok_in(
        &[
            "meta-train",
            "--config",
            "protonet.toml",
            "--out",
            "proto-run",
            "--json",
        ],
        dir,
    ));
    let log = std::fs::read_to_string(s.dir.path().join("proto-run/log.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["meta_loss"].as_f64())
        .collect();
    // Each line's meta-loss is the running mean of the recent iterations.
    assert_eq!(losses.len(), 8, "{log}");
    let (first, last) = (losses[0], losses[7]);
    assert!(
        last < first,
        "ProtoNet lowers the meta-loss on the training domains: {first} -> {last} ({trained})"
    );
    let after = last_json(&run_ok_in(
        &["meta-eval", "--model", "proto-run", "--json"],
        dir,
    ));
    assert_eq!(after["episodes"], 8);

    // adapt: a user's own support and query texts.
    std::fs::write(
        s.dir.path().join("support.csv"),
        "text,intent\norder pizza,pizza\ncall mom,call\n",
    )
    .unwrap();
    std::fs::write(
        s.dir.path().join("query.csv"),
        "text,intent\norder a pizza,pizza\ncall my mom,call\npizza today,pizza\n",
    )
    .unwrap();
    let adapt = |out: &str| {
        last_json(&run_ok_in(
            &[
                "adapt",
                "--model",
                "proto-run",
                "--support",
                "support.csv",
                "--query",
                "query.csv",
                "--out",
                out,
                "--json",
            ],
            dir,
        ))
    };
    let adapted = adapt("adapted.csv");
    assert_eq!(adapted["query_examples"], 3, "{adapted}");
    assert!(adapted["accuracy"].as_f64().is_some(), "{adapted}");
    let written = std::fs::read_to_string(s.dir.path().join("adapted.csv")).unwrap();
    assert!(written.starts_with("predicted,p_call,p_pizza"), "{written}");
    assert_eq!(written.lines().count(), 4);

    // The checkpoint carries its tokenizer: with the base encoder's folder gone, adapt and
    // meta-eval give the same answers.
    std::fs::rename(s.dir.path().join("encoder"), s.dir.path().join("moved")).unwrap();
    let again = adapt("adapted-alone.csv");
    assert_eq!(again["accuracy"], adapted["accuracy"], "{again}");
    assert_eq!(
        std::fs::read_to_string(s.dir.path().join("adapted-alone.csv")).unwrap(),
        written
    );
    let alone = last_json(&run_ok_in(
        &["meta-eval", "--model", "proto-run", "--json"],
        dir,
    ));
    assert_eq!(alone["mean"], after["mean"], "{alone}");
    let resumed = last_json(&run_ok_in(
        &[
            "meta-train",
            "--config",
            "protonet.toml",
            "--out",
            "proto-run",
            "--resume",
            "--iterations",
            "42",
            "--json",
        ],
        dir,
    ));
    assert_eq!(resumed["iterations"], 42, "{resumed}");
    std::fs::rename(s.dir.path().join("moved"), s.dir.path().join("encoder")).unwrap();

    // The MAML family and Reptile put a head on the encoder.
    for algorithm in ["anil", "maml", "meta_sgd", "reptile"] {
        let config = format!("{algorithm}.toml");
        let mut text = text_meta_config(algorithm, 3);
        if algorithm == "reptile" {
            text = text.replace("first_order = true\n", "");
        }
        std::fs::write(s.dir.path().join(&config), text).unwrap();
        let out = format!("{algorithm}-run");
        run_ok_in(
            &["meta-train", "--config", &config, "--out", &out, "--json"],
            dir,
        );
        let scored = last_json(&run_ok_in(&["meta-eval", "--model", &out, "--json"], dir));
        assert!(scored["mean"].as_f64().unwrap() >= 0.0, "{scored}");
        let inspect = run_ok_in(&["inspect", &format!("{out}/latest.safetensors")], dir);
        assert!(inspect.contains("transformer"), "{inspect}");
    }

    // Mistakes are named.
    let bad = text_meta_config("anil", 3).replace("\"food\"", "\"fod\"");
    std::fs::write(s.dir.path().join("bad.toml"), bad).unwrap();
    let err = run_err_in(&["meta-train", "--config", "bad.toml"], dir);
    assert!(err.contains("`fod`") && err.contains("food"), "{err}");
    let bad = text_meta_config("anil", 3).replace("text_column = \"text\"\n", "");
    std::fs::write(s.dir.path().join("bad.toml"), bad).unwrap();
    let err = run_err_in(&["meta-train", "--config", "bad.toml"], dir);
    assert!(err.contains("text_column"), "{err}");
}
