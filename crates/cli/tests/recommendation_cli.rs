//! Cold-start recommendation from the command line, on a synthetic data set in MovieLens'
//! layout (ratings.csv with a partition column, users.csv, items.csv) with a planted
//! structure: a user's segment (a feature) sets their taste for genres, and each user has a
//! personal offset that no feature reveals, so only adapting to their support ratings finds
//! it. Meta-learning must beat the baselines there; bad input must give clear errors.

mod common;

use std::fmt::Write as _;
use std::path::Path;

use common::cli::{last_json, run_err_in, run_ok_in};

/// A small deterministic generator (SplitMix64), so the data needs no RNG crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const GENRES: usize = 6;
const SEGMENTS: usize = 4;

/// Writes the three files: `warm` users, `cold` new users, 60 items.
fn write_data(dir: &Path, warm: usize, cold: usize) {
    let mut rng = Rng(7);
    let taste: Vec<Vec<f64>> = (0..SEGMENTS)
        .map(|_| {
            (0..GENRES)
                .map(|_| if rng.uniform() < 0.5 { -1.2 } else { 1.2 })
                .collect()
        })
        .collect();
    let items = 60;
    let mut item_genres = Vec::new();
    let mut items_csv = String::from("item,title,genres\n");
    for i in 0..items {
        let a = rng.below(GENRES);
        let b = rng.below(GENRES);
        let genres: Vec<usize> = if a == b { vec![a] } else { vec![a, b] };
        let names: Vec<String> = genres.iter().map(|g| format!("g{g}")).collect();
        writeln!(
            items_csv,
            "{i},\"Film {i}, part {}\",{}",
            i % 3,
            names.join("|")
        )
        .unwrap();
        item_genres.push(genres);
    }
    let mut users_csv = String::from("user,segment,age\n");
    let mut ratings = String::from("user,item,rating,partition\n");
    for u in 0..warm + cold {
        let segment = rng.below(SEGMENTS);
        writeln!(users_csv, "{u},s{segment},{}", 20 + rng.below(40)).unwrap();
        let offset = rng.uniform() * 2.0 - 1.0;
        let count = 18 + rng.below(12);
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < count {
            seen.insert(rng.below(items));
        }
        for &i in &seen {
            let g = &item_genres[i];
            let like: f64 = g.iter().map(|&k| taste[segment][k]).sum::<f64>() / g.len() as f64;
            let noise = (rng.uniform() - 0.5) * 0.6;
            let r = (3.0 + offset + like + noise).round().clamp(1.0, 5.0);
            let partition = if u < warm { "warm" } else { "user_cold" };
            writeln!(ratings, "{u},{i},{r},{partition}").unwrap();
        }
    }
    std::fs::write(dir.join("items.csv"), items_csv).unwrap();
    std::fs::write(dir.join("users.csv"), users_csv).unwrap();
    std::fs::write(dir.join("ratings.csv"), ratings).unwrap();
}

fn config(dir: &Path, algorithm: &str) -> std::path::PathBuf {
    let text = format!(
        r#"
[task]
kind = "recommendation"
data = "{data}"

[task.ratings]
user_categorical = ["segment"]
user_numeric = []
item_multi_valued = ["genres"]
embedding_dim = 8
min_ratings = 13
max_ratings = 100
query = 10

[model]
arch = "recommender"
hidden = [16]
activation = "relu"

[algorithm]
{algorithm}

[training]
iterations = 300
meta_batch = 16
outer_lr = 0.01
validate_every = 0
checkpoint_every = 0
seed = 0
"#,
        data = dir.join("data").display()
    );
    let path = dir.join("melu.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn mae(report: &serde_json::Value, path: &[&str]) -> f64 {
    let mut v = report;
    for key in path {
        v = &v[*key];
    }
    v["mae"]
        .as_f64()
        .unwrap_or_else(|| panic!("no mae at {path:?}: {report}"))
}

#[test]
fn meta_learning_beats_the_baselines_on_new_users_with_a_planted_preference() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    write_data(&dir.path().join("data"), 160, 40);
    let cfg = config(
        dir.path(),
        "name = \"maml\"\nadapt_from = \"fc1\"\ninner_lr = 0.1\ninner_steps = 3\neval_inner_steps = 3",
    );
    let run = dir.path().join("run");
    run_ok_in(
        &[
            "meta-train",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--quiet",
        ],
        None,
    );
    let out = run_ok_in(
        &["meta-eval", "--model", run.to_str().unwrap(), "--json"],
        None,
    );
    let report = last_json(&out);
    let partition = &report["partitions"]["user_cold"];
    for key in [
        "mae",
        "rmse",
        "ndcg@1",
        "ndcg@3",
        "ndcg@5",
        "ndcg_linear@1",
        "ndcg_linear@3",
        "users",
    ] {
        assert!(partition.get(key).is_some(), "no `{key}` in {partition}");
    }
    assert_eq!(partition["users"], 40, "{report}");
    let model = mae(&report, &["partitions", "user_cold"]);
    for baseline in ["global_mean", "item_mean", "user_support_mean"] {
        let b = mae(&report, &["baselines", baseline, "user_cold"]);
        eprintln!("user_cold MAE: maml {model:.4}, {baseline} {b:.4}");
        assert!(
            model < b,
            "meta-learned MAE {model:.4} does not beat {baseline} ({b:.4}): {report}"
        );
    }
    // One new user's few ratings: the top items exclude what they rated, best first.
    let mine = dir.path().join("mine.csv");
    std::fs::write(&mine, "item,rating\n0,5\n1,1\n2,4\n").unwrap();
    let features = dir.path().join("me.csv");
    std::fs::write(&features, "segment,age\ns1,30\n").unwrap();
    let top = last_json(&run_ok_in(
        &[
            "recommend",
            "--model",
            run.to_str().unwrap(),
            "--ratings",
            mine.to_str().unwrap(),
            "--user-features",
            features.to_str().unwrap(),
            "--top",
            "5",
            "--json",
        ],
        None,
    ));
    let items = top["recommendations"].as_array().unwrap();
    assert_eq!(items.len(), 5, "{top}");
    let predicted: Vec<f64> = items
        .iter()
        .map(|r| r["predicted"].as_f64().unwrap())
        .collect();
    assert!(predicted.windows(2).all(|w| w[0] >= w[1]), "{top}");
    assert!(
        items
            .iter()
            .all(|r| !["0", "1", "2"].contains(&r["item"].as_str().unwrap())),
        "rated items recommended: {top}"
    );
    std::fs::write(&mine, "item,rating\n0,5\nnope,3\n").unwrap();
    let err = run_err_in(
        &[
            "recommend",
            "--model",
            run.to_str().unwrap(),
            "--ratings",
            mine.to_str().unwrap(),
        ],
        None,
    );
    assert!(
        err.contains("unknown to the model") && err.contains("nope"),
        "{err}"
    );

    // Another support/query draw scores other query sets.
    let other = last_json(&run_ok_in(
        &[
            "meta-eval",
            "--model",
            run.to_str().unwrap(),
            "--json",
            "--seed",
            "1",
        ],
        None,
    ));
    assert_ne!(
        mae(&other, &["baselines", "user_support_mean", "user_cold"]),
        mae(&report, &["baselines", "user_support_mean", "user_cold"])
    );
}

#[test]
fn bad_ratings_files_name_the_file_line_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_data(&data, 20, 5);
    let cfg = config(dir.path(), "name = \"maml\"\nadapt_from = \"fc1\"");
    let out = dir.path().join("run");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "meta-train",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        run_err_in(&args, None)
    };
    let original = std::fs::read_to_string(data.join("ratings.csv")).unwrap();

    std::fs::write(
        data.join("ratings.csv"),
        format!("{original}3,4,five,warm\n"),
    )
    .unwrap();
    let err = train(&[]);
    assert!(
        err.contains("ratings.csv:") && err.contains("`five` is not a number"),
        "{err}"
    );

    std::fs::write(data.join("ratings.csv"), format!("{original}3,4,9,warm\n")).unwrap();
    let err = train(&[]);
    assert!(err.contains("outside the scale [1, 5]"), "{err}");

    std::fs::write(
        data.join("ratings.csv"),
        format!("{original}999,4,3,warm\n"),
    )
    .unwrap();
    let err = train(&[]);
    assert!(
        err.contains("1 users of") && err.contains("allow_unknown_ids"),
        "{err}"
    );

    std::fs::write(data.join("ratings.csv"), format!("{original}3,4,,warm\n")).unwrap();
    let err = train(&[]);
    assert!(err.contains("is not a number"), "{err}");
    std::fs::write(data.join("ratings.csv"), &original).unwrap();

    let users = std::fs::read_to_string(data.join("users.csv")).unwrap();
    let blanked: Vec<String> = users
        .lines()
        .enumerate()
        .map(|(i, line)| match i {
            // User 0's segment left empty.
            1 => {
                let cells: Vec<&str> = line.split(',').collect();
                format!("{},,{}", cells[0], cells[2])
            }
            _ => line.to_string(),
        })
        .collect();
    std::fs::write(data.join("users.csv"), blanked.join("\n") + "\n").unwrap();
    let err = train(&[]);
    assert!(
        err.contains("users.csv:2: column `segment`: empty cell"),
        "{err}"
    );
    assert!(!out.join("latest.safetensors").exists(), "nothing written");
}
