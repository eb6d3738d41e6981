//! Text classification in the library: CLINC150 files to CSV, the few-shot draw, and the
//! out-of-scope threshold (the chosen one is the best of all candidates), labels as training
//! examples, on a tiny random encoder in the Hugging Face layout.

mod common;

use std::path::Path;

use anyhow::{ensure, Result};
use candle_core::DType;

use common::text_model::write_tiny_encoder;
use metalearn::data::clinc150::write_clinc150_csvs;
use metalearn::data::text::{draw_shots, load_labelled_texts, LabelledTexts};
use metalearn::text::TextEncoder;
use metalearn::transfer::text::train::label_as_text;
use metalearn::transfer::text::{
    choose_threshold, score_texts, train_text_classifier, TextClassifier, TextMethod,
    TextTrainPlan, TextTrainReport, UnknownRule,
};

/// Trains on the `text` and `intent` columns, with `oos` rows out of scope.
fn train_intents(
    encoder: &TextEncoder,
    data: &LabelledTexts,
    plan: &TextTrainPlan,
) -> metalearn::error::Result<(TextClassifier, TextTrainReport)> {
    train_text_classifier(
        encoder,
        data,
        Some("oos"),
        plan,
        "text",
        "intent",
        &mut |_| {},
    )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
}

#[test]
fn clinc150_json_becomes_three_csv_files() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write(
        &dir.path().join("data_full.json"),
        r#"{"train": [["play music", "play_music"], ["my balance, please", "balance"]],
            "val": [["a \"quoted\" song", "play_music"]],
            "test": [["bank balance", "balance"]],
            "oos_train": [["order pizza", "oos"]], "oos_val": [], "oos_test": [["hi", "oos"]]}"#,
    );
    write(
        &dir.path().join("domains.json"),
        r#"{"media": ["play_music"], "banking": ["balance"]}"#,
    );
    let out = dir.path().join("csv");
    let counts = write_clinc150_csvs(dir.path(), &out)?;
    ensure!(
        counts.files[0] == ("train.csv".to_string(), 2, 1),
        "{counts:?}"
    );
    let train = load_labelled_texts(&out.join("train.csv"), "text", Some("intent"))?;
    ensure!(train.texts == ["play music", "my balance, please", "order pizza"]);
    ensure!(train.labels == ["play_music", "balance", "oos"]);
    let domains = load_labelled_texts(&out.join("train.csv"), "text", Some("domain"))?;
    ensure!(domains.labels == ["media", "banking", "oos"]);
    let val = load_labelled_texts(&out.join("val.csv"), "text", Some("intent"))?;
    ensure!(val.texts == ["a \"quoted\" song"]);
    // An intent outside domains.json is an error naming it.
    write(
        &dir.path().join("domains.json"),
        r#"{"media": ["play_music"]}"#,
    );
    let e = write_clinc150_csvs(dir.path(), &out)
        .expect_err("refused")
        .to_string();
    ensure!(e.contains("intent `balance` is in no domain"), "{e}");
    Ok(())
}

#[test]
fn few_shot_draws_are_per_class_and_nested() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut csv = String::from("text,label\n");
    for i in 0..30 {
        csv.push_str(&format!("text {i},{}\n", ["a", "b", "c"][i % 3]));
    }
    csv.push_str("other,oos\n");
    write(&dir.path().join("d.csv"), &csv);
    let data = load_labelled_texts(&dir.path().join("d.csv"), "text", Some("label"))?;
    let four = draw_shots(&data, 4, 9, Some("oos"))?;
    let two = draw_shots(&data, 2, 9, Some("oos"))?;
    ensure!(four.len() == 12 && two.len() == 6);
    for class in 0..3 {
        ensure!(
            two[class * 2..class * 2 + 2] == four[class * 4..class * 4 + 2],
            "nested draws"
        );
        ensure!(four[class * 4..class * 4 + 4]
            .iter()
            .all(|&i| i % 3 == class));
    }
    ensure!(
        draw_shots(&data, 4, 10, Some("oos"))? != four,
        "the seed matters"
    );
    let e = draw_shots(&data, 11, 0, Some("oos"))
        .expect_err("too few")
        .to_string();
    ensure!(e.contains("class `a` has only 10 rows"), "{e}");
    Ok(())
}

#[test]
fn the_chosen_threshold_is_the_best_candidate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_tiny_encoder(&dir.path().join("enc"), 11, 16);
    let encoder = TextEncoder::from_folder(&dir.path().join("enc"), DType::F32)?;
    let rows = [
        ("what is my bank balance", "balance"),
        ("my bank balance", "balance"),
        ("play music", "music"),
        ("play a song", "music"),
        ("set alarm for tomorrow", "alarm"),
        ("set an alarm", "alarm"),
        ("order pizza", "oos"),
        ("freeze my credit card", "oos"),
        ("turn off lights", "oos"),
        ("the weather today", "oos"),
    ];
    let mut csv = String::from("text,intent\n");
    for (t, l) in rows {
        csv.push_str(&format!("{t},{l}\n"));
    }
    write(&dir.path().join("d.csv"), &csv);
    let data = load_labelled_texts(&dir.path().join("d.csv"), "text", Some("intent"))?;
    let plan = TextTrainPlan {
        method: TextMethod::LinearProbe,
        head_steps: 100,
        ..TextTrainPlan::default()
    };
    let (mut model, report) = train_intents(&encoder, &data, &plan)?;
    ensure!(report.classes == 3 && report.rows == 6);
    let rule = |threshold| {
        Some(UnknownRule {
            label: "oos".into(),
            threshold,
        })
    };
    model.set_unknown(rule(0.0));
    let chosen = choose_threshold(&model, &data, 4)?;
    model.set_unknown(rule(chosen));
    let best = score_texts(&model, &data, 4)?.accuracy;
    for t in 0..=100 {
        model.set_unknown(rule(t as f64 / 100.0));
        let accuracy = score_texts(&model, &data, 4)?.accuracy;
        ensure!(
            accuracy <= best + 1e-12,
            "threshold {t}% scores {accuracy} > {best} at {chosen}"
        );
    }
    Ok(())
}

#[test]
fn labels_as_examples_join_their_classes() -> Result<()> {
    ensure!(label_as_text("book_flight").as_deref() == Some("book flight"));
    ensure!(label_as_text(" change-user__name ").as_deref() == Some("change user name"));
    ensure!(label_as_text("_-_").is_none());

    let dir = tempfile::tempdir()?;
    write_tiny_encoder(&dir.path().join("enc"), 5, 16);
    let encoder = TextEncoder::from_folder(&dir.path().join("enc"), DType::F32)?;
    write(
        &dir.path().join("d.csv"),
        "text,intent\nwhat is my balance,bank_balance\nthe balance today,bank_balance\n\
         play a song,play-music\nturn on music,play-music\norder pizza,oos\n",
    );
    let data = load_labelled_texts(&dir.path().join("d.csv"), "text", Some("intent"))?;
    let plan = TextTrainPlan {
        method: TextMethod::Prototype,
        labels_as_examples: true,
        ..TextTrainPlan::default()
    };
    let (model, report) = train_intents(&encoder, &data, &plan)?;
    ensure!(report.rows == 4 && report.label_examples == 2, "{report:?}");
    // Each prototype is the mean of the class's rows and its label, read as text.
    let head = model.params().get("head.weight")?.to_vec2::<f32>()?;
    let members = [
        ["what is my balance", "the balance today", "bank balance"],
        ["play a song", "turn on music", "play music"],
    ];
    for (class, texts) in members.iter().enumerate() {
        let vectors = encoder.embed(texts, 4)?.vectors.to_vec2::<f32>()?;
        let sum: Vec<f64> = (0..vectors[0].len())
            .map(|d| vectors.iter().map(|v| v[d] as f64).sum())
            .collect();
        let norm = sum.iter().map(|v| v * v).sum::<f64>().sqrt();
        let column: Vec<f64> = head.iter().map(|row| row[class] as f64).collect();
        let scale = column.iter().map(|v| v * v).sum::<f64>().sqrt();
        for (got, want) in column.iter().zip(&sum) {
            ensure!(
                (got / scale - want / norm).abs() < 1e-5,
                "class {class}: prototype {column:?} is not the mean of {texts:?}"
            );
        }
    }
    Ok(())
}
