//! Config files that are wrong in every way we could think of: each must be refused with a
//! message that names the key (and, for files, the path and line) and says what to change; every
//! shipped config must still load.

use std::path::{Path, PathBuf};
use std::process::Command;

use metalearn::config::suggest::{closest, edit_distance};
use metalearn::experiment::ExperimentConfig;
use metalearn::transfer::config::{load_for, FileConfig};

/// A valid sinusoid experiment to break one key at a time.
const SINE: &str = r#"
[task]
kind = "sinusoid"
amplitude = [0.1, 5.0]
phase = [0.0, 3.14]
x_range = [-5.0, 5.0]
support = 10
query = 10
test_grid = 100

[model]
arch = "mlp"
hidden = [40, 40]
activation = "relu"

[algorithm]
name = "maml"
first_order = false
inner_lr = 0.01
inner_steps = 1
eval_inner_steps = 10

[training]
iterations = 100
meta_batch = 4
outer_lr = 0.001
validate_every = 50
validation_tasks = 10
checkpoint_every = 50
seed = 0

[eval]
episodes = 600
baseline_iterations = 100
baseline_lr = 0.001
"#;

/// A valid classification experiment to break one key at a time.
const IMAGES: &str = r#"
[task]
kind = "classification"
data = "data/images"
image_size = [28, 28]
channels = 1
ways = 5
shots = 1
queries = 15
split = [0.6, 0.2, 0.2]

[model]
arch = "conv4"
width = 64

[algorithm]
name = "maml"
inner_lr = 0.4
inner_steps = 1

[training]
iterations = 100
meta_batch = 4
validate_every = 50
validation_tasks = 10
"#;

/// `base` with the first occurrence of `from` replaced by `to` (which must change it).
fn edit(base: &str, from: &str, to: &str) -> String {
    assert!(base.contains(from), "`{from}` is not in the base config");
    base.replacen(from, to, 1)
}

/// The error message of a config text that must be refused.
fn meta_error(text: &str) -> String {
    match ExperimentConfig::from_toml(text) {
        Ok(_) => panic!("accepted a bad config:\n{text}"),
        Err(e) => {
            let message = e.to_string();
            assert!(!message.contains("panicked"), "{message}");
            message
        }
    }
}

fn file_error(text: &str) -> String {
    match FileConfig::from_toml(text) {
        Ok(_) => panic!("accepted a bad config:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts that `message` contains every one of `parts`.
fn says(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "`{part}` missing from: {message}");
    }
}

/// 1-based line of the first line of `text` that starts with `prefix`.
fn line_of(text: &str, prefix: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(prefix))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("no line starts with `{prefix}`"))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

// ---------------------------------------------------------------- suggestions

#[test]
fn edit_distance_counts_single_character_edits() {
    assert_eq!(edit_distance("ways", "ways"), 0);
    assert_eq!(edit_distance("wayz", "ways"), 1);
    assert_eq!(edit_distance("", "abc"), 3);
    assert_eq!(edit_distance("kitten", "sitting"), 3);
    assert_eq!(edit_distance("adma", "adam"), 1, "a swap is one edit");
    assert_eq!(
        edit_distance("meta_bach", "meta_batch"),
        edit_distance("meta_batch", "meta_bach")
    );
}

#[test]
fn closest_suggests_near_names_and_nothing_for_far_ones() {
    let keys = ["ways", "shots", "queries", "split_seed"];
    assert_eq!(closest("wayz", &keys), Some("ways"));
    assert_eq!(closest("Shots", &keys), Some("shots"));
    assert_eq!(closest("querys", &keys), Some("queries"));
    assert_eq!(closest("split-seed", &keys), Some("split_seed"));
    assert_eq!(closest("seed", &keys), Some("split_seed"), "contained name");
    assert_eq!(closest("temperature", &keys), None);
    assert_eq!(
        closest("learning_rate", &["epochs", "lr"]),
        Some("lr"),
        "initials"
    );
}

// ---------------------------------------------------------------- unknown keys

#[test]
fn unknown_key_in_each_section_is_named_with_a_suggestion_and_the_valid_keys() {
    let cases = [
        (
            SINE,
            "support = 10",
            "suport = 10",
            "task",
            "suport",
            "support",
        ),
        (IMAGES, "ways = 5", "wayz = 5", "task", "wayz", "ways"),
        (
            SINE,
            "hidden = [40, 40]",
            "hiden = [40, 40]",
            "model",
            "hiden",
            "hidden",
        ),
        (
            SINE,
            "inner_steps = 1",
            "inner_step = 1",
            "algorithm",
            "inner_step",
            "inner_steps",
        ),
        (
            SINE,
            "meta_batch = 4",
            "meta_bach = 4",
            "training",
            "meta_bach",
            "meta_batch",
        ),
        (
            SINE,
            "episodes = 600",
            "episode = 600",
            "eval",
            "episode",
            "episodes",
        ),
    ];
    for (base, from, to, section, wrong, right) in cases {
        let message = meta_error(&edit(base, from, to));
        says(
            &message,
            &[
                &format!("unknown key `{wrong}` in [{section}]"),
                &format!("did you mean `{right}`?"),
                &format!("Valid keys of [{section}]:"),
            ],
        );
        // The list of valid keys is the section's, complete.
        let listed = message.split("Valid keys of").nth(1).unwrap();
        assert!(listed.contains(right), "{message}");
    }
}

#[test]
fn unknown_key_carries_its_line_and_column() {
    let text = edit(SINE, "meta_batch = 4", "meta_bach = 4");
    let message = meta_error(&text);
    let line = line_of(&text, "meta_bach");
    assert!(
        message.starts_with(&format!("line {line}, column 1: ")),
        "{message}"
    );
}

#[test]
fn unknown_keys_in_nested_tables_are_named() {
    let text = edit(
        SINE,
        "seed = 0",
        "seed = 0\nschedule = { type = \"step\", every = 10, facter = 0.5 }",
    );
    says(
        &meta_error(&text),
        &["`facter`", "[training.schedule]", "did you mean `factor`?"],
    );

    let text = edit(
        IMAGES,
        "split = [0.6, 0.2, 0.2]",
        "split_alphabets = { tran = [\"Latin\"] }",
    );
    says(
        &meta_error(&text),
        &["`tran`", "[task.split_alphabets]", "did you mean `train`?"],
    );
}

#[test]
fn a_key_in_the_wrong_section_is_sent_to_the_right_one() {
    let text = edit(SINE, "meta_batch = 4", "meta_batch = 4\ninner_lr = 0.1");
    says(
        &meta_error(&text),
        &[
            "unknown key `inner_lr` in [training]",
            "belongs in [algorithm]",
        ],
    );

    let text = format!("ways = 5\n{IMAGES}");
    says(
        &meta_error(&text),
        &["`ways` must be inside a section", "[task]"],
    );
}

#[test]
fn misspelt_section_gets_a_suggestion() {
    let message = meta_error(&edit(SINE, "[training]", "[trainig]"));
    says(
        &message,
        &[
            "unknown section [trainig]",
            "did you mean [training]?",
            "[task], [model], [algorithm], [training], [eval]",
        ],
    );
}

// ---------------------------------------------------------------- wrong types

#[test]
fn wrong_types_name_the_key_and_the_expected_type() {
    let cases = [
        (
            IMAGES,
            "ways = 5",
            "ways = \"five\"",
            "`task.ways`",
            "whole number",
        ),
        (
            IMAGES,
            "ways = 5",
            "ways = -1",
            "`task.ways`",
            "whole number",
        ),
        (
            IMAGES,
            "ways = 5",
            "ways = 2.5",
            "`task.ways`",
            "whole number",
        ),
        (
            SINE,
            "inner_lr = 0.01",
            "inner_lr = \"fast\"",
            "`algorithm.inner_lr`",
            "a number",
        ),
        (
            SINE,
            "first_order = false",
            "first_order = 1",
            "`algorithm.first_order`",
            "true or false",
        ),
        (
            SINE,
            "hidden = [40, 40]",
            "hidden = \"40\"",
            "`model.hidden`",
            "array",
        ),
        (
            SINE,
            "amplitude = [0.1, 5.0]",
            "amplitude = [0.1]",
            "`task.amplitude`",
            "length 2",
        ),
        (SINE, "arch = \"mlp\"", "arch = 4", "`model.arch`", "string"),
    ];
    for (base, from, to, key, expected) in cases {
        let text = edit(base, from, to);
        let message = meta_error(&text);
        says(&message, &[key, expected]);
        let line = line_of(&text, to);
        assert!(message.starts_with(&format!("line {line}, ")), "{message}");
    }
}

#[test]
fn a_date_where_a_number_belongs_is_named_too() {
    // Dates are the one TOML value whose key positions the checker cannot read; the key is then
    // found from the line.
    let text = edit(IMAGES, "ways = 5", "ways = 1979-05-27");
    let message = meta_error(&text);
    let line = line_of(&text, "ways =");
    says(
        &message,
        &[
            &format!("line {line}, "),
            "`task.ways`",
            "whole number",
            "date",
        ],
    );
}

#[test]
fn unknown_names_of_enumerated_values_get_suggestions() {
    says(
        &meta_error(&edit(SINE, "name = \"maml\"", "name = \"mamll\"")),
        &[
            "`algorithm.name`",
            "\"mamll\"",
            "did you mean \"maml\"",
            "reptile",
            "protonet",
        ],
    );
    says(
        &meta_error(&edit(SINE, "kind = \"sinusoid\"", "kind = \"sinusiod\"")),
        &["`task.kind`", "did you mean \"sinusoid\"", "classification"],
    );
    says(
        &meta_error(&edit(SINE, "arch = \"mlp\"", "arch = \"mpl\"")),
        &["`model.arch`", "did you mean \"mlp\"", "conv4"],
    );
    says(
        &meta_error(&edit(
            SINE,
            "activation = \"relu\"",
            "activation = \"rellu\"",
        )),
        &["`model.activation`", "did you mean \"relu\""],
    );
    says(
        &meta_error(&edit(
            IMAGES,
            "channels = 1",
            "channels = 1\nresample = \"lanczos\"",
        )),
        &["`task.resample`", "did you mean \"lanczos3\""],
    );
    says(
        &meta_error(&edit(
            SINE,
            "seed = 0",
            "seed = 0\nschedule = { type = \"cosin\" }",
        )),
        &["did you mean \"cosine\"", "constant", "step"],
    );
}

// ---------------------------------------------------------------- ranges

#[test]
fn every_numeric_field_is_range_checked() {
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            IMAGES,
            "ways = 5",
            "ways = 1",
            &["`task.ways` must be >= 2", "got 1"],
        ),
        (
            IMAGES,
            "shots = 1",
            "shots = 0",
            &["`task.shots` must be >= 1"],
        ),
        (
            IMAGES,
            "queries = 15",
            "queries = 0",
            &["`task.queries` must be >= 1"],
        ),
        (
            IMAGES,
            "image_size = [28, 28]",
            "image_size = [0, 28]",
            &["`task.image_size`", ">= 1"],
        ),
        (
            IMAGES,
            "channels = 1",
            "channels = 2",
            &["`task.channels` must be 1 (grey) or 3 (RGB)"],
        ),
        (
            IMAGES,
            "split = [0.6, 0.2, 0.2]",
            "split = [0.6, 0.2, 0.3]",
            &["`task.split`", "sum"],
        ),
        (
            IMAGES,
            "split = [0.6, 0.2, 0.2]",
            "split = [1.5, -0.3, -0.2]",
            &["`task.split`", "[0, 1]"],
        ),
        (
            IMAGES,
            "split = [0.6, 0.2, 0.2]",
            "split = [0.0, 0.5, 0.5]",
            &["`task.split`", "meta-training"],
        ),
        (
            IMAGES,
            "split = [0.6, 0.2, 0.2]",
            "split = [0.8, 0.0, 0.2]",
            &["no validation classes", "validate_every"],
        ),
        (
            IMAGES,
            "width = 64",
            "width = 0",
            &["`model.width` must be >= 1"],
        ),
        (
            SINE,
            "support = 10",
            "support = 0",
            &["`task.support` must be >= 1"],
        ),
        (
            SINE,
            "query = 10",
            "query = 0",
            &["`task.query` must be >= 1"],
        ),
        (
            SINE,
            "test_grid = 100",
            "test_grid = 0",
            &["`task.test_grid` must be >= 1"],
        ),
        (
            SINE,
            "amplitude = [0.1, 5.0]",
            "amplitude = [5.0, 0.1]",
            &["`task.amplitude`", "min <= max"],
        ),
        (
            SINE,
            "phase = [0.0, 3.14]",
            "phase = [0.0, nan]",
            &["`task.phase`", "finite"],
        ),
        (
            SINE,
            "x_range = [-5.0, 5.0]",
            "x_range = [-inf, 5.0]",
            &["`task.x_range`", "finite"],
        ),
        (
            SINE,
            "hidden = [40, 40]",
            "hidden = [40, 0]",
            &["`model.hidden`", ">= 1", "entry 1"],
        ),
        (
            SINE,
            "activation = \"relu\"",
            "activation = \"relu\"\nembedding = 0",
            &["`model.embedding` must be >= 1"],
        ),
        (
            SINE,
            "inner_lr = 0.01",
            "inner_lr = 0.0",
            &["`algorithm.inner_lr` must be a finite number > 0"],
        ),
        (
            SINE,
            "inner_lr = 0.01",
            "inner_lr = -0.1",
            &["`algorithm.inner_lr`", "> 0"],
        ),
        (
            SINE,
            "inner_lr = 0.01",
            "inner_lr = inf",
            &["`algorithm.inner_lr`", "finite"],
        ),
        (
            SINE,
            "inner_steps = 1",
            "inner_steps = 0",
            &["`algorithm.inner_steps` must be >= 1"],
        ),
        (
            SINE,
            "iterations = 100",
            "iterations = 0",
            &["`training.iterations` must be >= 1"],
        ),
        (
            SINE,
            "meta_batch = 4",
            "meta_batch = 0",
            &["`training.meta_batch` must be >= 1"],
        ),
        (
            SINE,
            "outer_lr = 0.001",
            "outer_lr = -1.0",
            &["`training.outer_lr`", "> 0"],
        ),
        (
            SINE,
            "validation_tasks = 10",
            "validation_tasks = 0",
            &["`training.validation_tasks` must be >= 1"],
        ),
        (
            SINE,
            "seed = 0",
            "seed = 0\nschedule = { type = \"cosine\", min_factor = 1.5 }",
            &["min_factor", "[0, 1]"],
        ),
        (
            SINE,
            "seed = 0",
            "seed = 0\nschedule = { type = \"step\", every = 0, factor = 0.5 }",
            &["every", ">= 1"],
        ),
        (
            SINE,
            "seed = 0",
            "seed = 0\nschedule = { type = \"step\", every = 10, factor = 0.0 }",
            &["factor", "(0, 1]"],
        ),
        (
            SINE,
            "episodes = 600",
            "episodes = 0",
            &["`eval.episodes` must be >= 1"],
        ),
        (
            SINE,
            "baseline_iterations = 100",
            "baseline_iterations = 0",
            &["`eval.baseline_iterations` must be >= 1"],
        ),
        (
            SINE,
            "baseline_lr = 0.001",
            "baseline_lr = 0.0",
            &["`eval.baseline_lr`", "> 0"],
        ),
    ];
    for (base, from, to, parts) in cases {
        let text = edit(base, from, to);
        let message = meta_error(&text);
        says(&message, parts);
        // The message points at the line of the offending key.
        let key = to.lines().last().unwrap().split('=').next().unwrap().trim();
        let line = line_of(&text, &format!("{key} ="));
        assert!(
            message.starts_with(&format!("line {line}, column 1: ")),
            "expected line {line} in: {message}"
        );
    }
}

#[test]
fn zero_evaluation_steps_and_no_validation_are_allowed() {
    let text = edit(SINE, "eval_inner_steps = 10", "eval_inner_steps = 0");
    ExperimentConfig::from_toml(&text).expect("0 steps scores the meta-learned start");
    let text = edit(IMAGES, "split = [0.6, 0.2, 0.2]", "split = [0.8, 0.0, 0.2]");
    let text = edit(&text, "validate_every = 50", "validate_every = 0");
    ExperimentConfig::from_toml(&text).expect("no validation classes when not validating");
    let text = edit(IMAGES, "name = \"maml\"", "name = \"protonet\"");
    let text = edit(&text, "inner_steps = 1", "inner_steps = 0");
    ExperimentConfig::from_toml(&text).expect("protonet has no inner loop");
}

#[test]
fn cross_field_checks_name_both_sides() {
    says(
        &meta_error(&edit(SINE, "name = \"maml\"", "name = \"protonet\"")),
        &["protonet", "classification"],
    );
    says(
        &meta_error(&edit(SINE, "arch = \"mlp\"", "arch = \"conv4\"")),
        &["`model.arch`", "conv4", "mlp"],
    );
    says(
        &meta_error(&edit(SINE, "test_grid = 100", "test_grid = 100\nways = 5")),
        &["`task.ways` applies only to task.kind = \"classification\""],
    );
    says(
        &meta_error(&edit(
            SINE,
            "test_grid = 100",
            "test_grid = 100\nreflections = true",
        )),
        &["`task.reflections` applies only to task.kind = \"classification\""],
    );
    says(
        &meta_error(&edit(IMAGES, "ways = 5", "ways = 5\nsupport = 5")),
        &[
            "`task.support` applies only to task.kind = \"sinusoid\"",
            "shots",
        ],
    );
    says(
        &meta_error(&edit(
            IMAGES,
            "channels = 1",
            "channels = 1\nsplit_alphabets = { train = [\"Latin\"] }",
        )),
        &["split_alphabets", "remove task.split"],
    );
    says(
        &meta_error(&edit(
            IMAGES,
            "image_size = [28, 28]",
            "image_size = [28, 32]\nrotations = true",
        )),
        &["rotations", "square"],
    );
    says(
        &meta_error(
            &edit(SINE, "name = \"maml\"", "name = \"reptile\"")
                .replace("first_order = false", "first_order = true"),
        ),
        &["`algorithm.first_order`", "reptile"],
    );
}

#[test]
fn validate_checks_values_set_after_parsing() {
    let mut config = ExperimentConfig::from_toml(SINE).unwrap();
    config.training.iterations = 0;
    let message = config.validate().unwrap_err().to_string();
    says(&message, &["`training.iterations` must be >= 1"]);
}

// ---------------------------------------------------------------- whole files

#[test]
fn empty_and_comment_only_files_are_refused_with_a_pointer() {
    for text in ["", "   \n\n", "# just a comment\n"] {
        says(&meta_error(text), &["empty", "[task]", "[algorithm]"]);
    }
}

#[test]
fn missing_sections_and_keys_are_named() {
    let without_algorithm = SINE.split("[algorithm]").next().unwrap().to_string();
    says(
        &meta_error(&without_algorithm),
        &["[algorithm] section is missing"],
    );
    let without_kind = edit(SINE, "kind = \"sinusoid\"\n", "");
    says(&meta_error(&without_kind), &["[task] needs the key `kind`"]);
}

#[test]
fn text_that_is_not_toml_is_refused_with_its_position() {
    let message = meta_error("[task\nkind = \"sinusoid\"\n");
    says(&message, &["not valid TOML", "line 1"]);
    let message = meta_error("[task]\nkind = = 3\n");
    says(&message, &["not valid TOML", "line 2"]);
    let message = file_error("epochs = [1, 2\n");
    says(&message, &["not valid TOML"]);
}

#[test]
fn file_errors_start_with_path_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let text = edit(IMAGES, "ways = 5", "wayz = 5");
    let path = write(dir.path(), "bad.toml", &text);
    let message = ExperimentConfig::from_file(&path).unwrap_err().to_string();
    let line = line_of(&text, "wayz");
    says(
        &message,
        &[
            &format!("{}:{line}:1: ", path.display()),
            "did you mean `ways`?",
        ],
    );

    let text = edit(IMAGES, "ways = 5", "ways = 1");
    let path = write(dir.path(), "range.toml", &text);
    let message = ExperimentConfig::from_file(&path).unwrap_err().to_string();
    let line = line_of(&text, "ways = 1");
    says(
        &message,
        &[&format!("{}:{line}:1: ", path.display()), "`task.ways`"],
    );

    let path = write(dir.path(), "empty.toml", "");
    let message = ExperimentConfig::from_file(&path).unwrap_err().to_string();
    says(&message, &[&format!("{}: ", path.display()), "empty"]);

    let missing = dir.path().join("absent.toml");
    let message = ExperimentConfig::from_file(&missing)
        .unwrap_err()
        .to_string();
    says(&message, &["absent.toml"]);
}

#[test]
fn meta_train_reports_the_location_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let text = edit(SINE, "meta_batch = 4", "meta_bach = 4");
    write(dir.path(), "bad.toml", &text);
    let out = Command::new(env!("CARGO_BIN_EXE_metalearn"))
        .args(["meta-train", "--config", "bad.toml", "--out", "run"])
        .current_dir(dir.path())
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let line = line_of(&text, "meta_bach");
    says(
        &stderr,
        &[&format!("bad.toml:{line}:1:"), "did you mean `meta_batch`?"],
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn every_shipped_config_parses_and_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let config = ExperimentConfig::from_file(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            config.validate().unwrap();
            // What a checkpoint stores must read back as the same config.
            let json = serde_json::to_value(&config).unwrap();
            let back: ExperimentConfig = serde_json::from_value(json).unwrap();
            assert_eq!(back, config, "{}", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 5, "only {seen} configs in {}", dir.display());
}

// ---------------------------------------------------------------- train / finetune files

#[test]
fn train_config_unknown_keys_get_suggestions_and_the_key_list() {
    let message = file_error("epochs = 3\nbatchsize = 8\n");
    says(
        &message,
        &[
            "line 2, column 1: ",
            "unknown key `batchsize`",
            "did you mean `batch_size`?",
            "Valid keys: data, target",
        ],
    );
    let message = file_error("epochs = 3\nlearning_rate = 0.1\n");
    says(
        &message,
        &["unknown key `learning_rate`", "did you mean `lr`?"],
    );
}

#[test]
fn train_config_wrong_types_name_the_key() {
    says(
        &file_error("epochs = \"many\""),
        &["`epochs`", "whole number"],
    );
    says(&file_error("lr = \"fast\""), &["`lr`", "a number"]);
    says(
        &file_error("hidden = 5"),
        &["`hidden`", "comma-separated string", "array"],
    );
    says(
        &file_error("linear_probe = \"yes\""),
        &["`linear_probe`", "true or false"],
    );
}

#[test]
fn train_config_values_are_range_checked() {
    let cases: &[(&str, &[&str])] = &[
        ("lr = 0.0", &["`lr`", "> 0"]),
        ("lr = nan", &["`lr`", "finite"]),
        ("epochs = 0", &["`epochs` must be >= 1"]),
        ("batch_size = 0", &["`batch_size` must be >= 1"]),
        ("early_stopping = 0", &["`early_stopping` must be >= 1"]),
        ("height = 0", &["`height` must be >= 1"]),
        ("width = 0", &["`width` must be >= 1"]),
        ("filters = 0", &["`filters` must be >= 1"]),
        ("new_head = 0", &["`new_head` must be >= 1"]),
        ("channels = 4", &["`channels` must be 1 (grey) or 3 (RGB)"]),
        ("validation_split = 1.0", &["`validation_split`", "(0, 1)"]),
        ("validation_split = 0.0", &["`validation_split`", "(0, 1)"]),
        ("weight_decay = -0.1", &["`weight_decay`", ">= 0"]),
        (
            "optimizer = \"sgd\"\nmomentum = 1.0",
            &["`momentum` must be in [0, 1)"],
        ),
        (
            "optimizer = \"adam\"\nmomentum = 0.9",
            &["`momentum` applies to optimizer = \"sgd\" only"],
        ),
        (
            "optimizer = \"adma\"",
            &["`optimizer`", "did you mean \"adam\""],
        ),
        (
            "activation = \"tanhh\"",
            &["`activation`", "did you mean \"tanh\""],
        ),
        (
            "loss = \"cross_entropi\"",
            &["`loss`", "did you mean \"cross_entropy\""],
        ),
        ("hidden = \"64,0\"", &["`hidden` entry `0`"]),
        ("hidden = \"64,x\"", &["`hidden` entry `x`"]),
        ("hidden = [64, 0]", &["`hidden` entry `0`"]),
        ("freeze = \"0,,1\"", &["`freeze`", "empty entry"]),
        (
            "data = \"a.csv\"\nimages = \"folder\"",
            &["either `data`", "not both"],
        ),
    ];
    for (text, parts) in cases {
        let message = file_error(text);
        says(&message, parts);
        assert!(message.starts_with("line "), "no line in: {message}");
    }
    // Values that are allowed.
    for ok in [
        "hidden = \"none\"",
        "hidden = \"64, 32\"",
        "optimizer = \"SGD\"\nmomentum = 0.9",
        "momentum = 0.5",
        "validation_split = 0.2",
        "freeze = [0, \"dense_2\"]",
    ] {
        FileConfig::from_toml(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn train_config_may_be_empty_but_not_invalid() {
    let config = FileConfig::from_toml("").unwrap();
    assert!(config.keys_set().is_empty());
    let config = FileConfig::from_toml("# nothing set\n").unwrap();
    assert!(config.keys_set().is_empty());
}

#[test]
fn load_for_refuses_the_other_commands_keys_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = "epochs = 3\nfreeze = \"0\"\n";
    let path = write(dir.path(), "tune.toml", text);
    let message = load_for(Some(&path), "train").unwrap_err().to_string();
    says(
        &message,
        &[
            &format!("{}:2:1: ", path.display()),
            "`freeze` is not used by `train`",
            "finetune",
        ],
    );
    load_for(Some(&path), "finetune").unwrap();

    let path = write(dir.path(), "arch.toml", "hidden = [8]\n");
    let message = load_for(Some(&path), "finetune").unwrap_err().to_string();
    says(
        &message,
        &["arch.toml:1:1: ", "`hidden` is not used by `finetune`"],
    );

    let path = write(dir.path(), "range.toml", "lr = 0.01\nepochs = 0\n");
    let message = load_for(Some(&path), "train").unwrap_err().to_string();
    says(&message, &["range.toml:2:1: ", "`epochs` must be >= 1"]);

    // Relative paths are resolved against the file's folder.
    let path = write(dir.path(), "paths.toml", "data = \"iris.csv\"\n");
    let config = load_for(Some(&path), "train").unwrap();
    assert_eq!(config.data.unwrap(), dir.path().join("iris.csv"));
}

// ---------------------------------------------------------------- text experiments

#[test]
fn text_experiment_keys_are_checked_together() {
    let text = edit(
        &edit(
            IMAGES,
            "image_size = [28, 28]\nchannels = 1\n",
            "text_column = \"text\"\ntarget = \"intent\"\n",
        ),
        "arch = \"conv4\"\nwidth = 64",
        "arch = \"encoder\"\nencoder = \"models/minilm\"",
    );
    ExperimentConfig::from_toml(&text).expect("a valid text experiment");

    let no_encoder = edit(&text, "encoder = \"models/minilm\"", "");
    says(
        &meta_error(&no_encoder),
        &["model.encoder", "pre-trained text encoder"],
    );
    let no_text = edit(&text, "text_column = \"text\"\n", "");
    says(&meta_error(&no_text), &["task.text_column", "reads texts"]);
    let groups_on_images = edit(IMAGES, "split = [0.6, 0.2, 0.2]", "group_column = \"g\"");
    says(
        &meta_error(&groups_on_images),
        &["task.group_column", "text data"],
    );
    let groups_without_column = edit(
        &text,
        "split = [0.6, 0.2, 0.2]",
        "split_groups = { train = [\"a\"], validation = [\"b\"] }",
    );
    says(
        &meta_error(&groups_without_column),
        &["task.split_groups", "group_column"],
    );
    let scale_on_maml = edit(
        &text,
        "inner_lr = 0.4",
        "inner_lr = 0.4\ndistance_scale = 5.0",
    );
    says(
        &meta_error(&scale_on_maml),
        &["algorithm.distance_scale", "protonet only"],
    );
    let encoder_on_conv = edit(IMAGES, "width = 64", "width = 64\nencoder = \"m\"");
    says(
        &meta_error(&encoder_on_conv),
        &["model.encoder", "arch = \"encoder\""],
    );
}
