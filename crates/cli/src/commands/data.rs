//! `metalearn data fetch omniglot|clinc150|movielens-1m`: downloads the Omniglot archives and the
//! one-shot benchmark runs (unpacked for `eval-runs`), the CLINC150 intent data (written as CSV
//! files), or MovieLens-1M (its usage licence shown once, the ratings, users and movies written as
//! CSV files), verifying checksums.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;

use metalearn::data::clinc150::{clinc150_files, write_clinc150_csvs, CLINC150_BASE_URL};
use metalearn::data::fetch::{
    extract_zip, fetch_files, omniglot_files, FetchOptions, Verification, OMNIGLOT_BASE_URL,
};
use metalearn::data::movielens::{
    convert_movielens_1m, licence_notice_due, movielens_1m_files, record_licence_notice,
    MOVIELENS_1M_ZIP, MOVIELENS_BASE_URL, MOVIELENS_LICENCE,
};
use metalearn::error::{Error, Result};

/// Arguments of `data`.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: DataAction,
}

/// The `data` actions.
#[derive(Subcommand, Debug, Clone)]
pub enum DataAction {
    /// Download a public data set into a folder, verifying checksums.
    Fetch(FetchArgs),
}

/// Arguments of `data fetch`.
#[derive(Args, Debug, Clone)]
pub struct FetchArgs {
    /// The data set: omniglot; clinc150 (downloaded, then written as train.csv, val.csv and
    /// test.csv with columns text,intent,domain; out-of-scope rows have intent `oos`); or
    /// movielens-1m (research use under GroupLens' licence, shown on the first fetch into DIR;
    /// written as ratings.csv, users.csv and items.csv).
    #[arg(value_parser = ["omniglot", "clinc150", "movielens-1m"])]
    pub dataset: String,
    /// Folder to download into (created if needed) [default: data/DATASET].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Where the files are published [default: the data set's public repository].
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// Fetch only these files (repeatable), e.g. --only images_background_small1.zip.
    #[arg(long, value_name = "FILE")]
    pub only: Vec<String>,
    /// Keep all_runs.zip packed (by default it is unpacked into DIR/all_runs for eval-runs).
    #[arg(long)]
    pub no_extract: bool,
    /// Print one JSON object with the results as the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs `data`.
pub fn run(args: &DataArgs) -> Result<()> {
    match &args.action {
        DataAction::Fetch(fetch) => run_fetch(fetch),
    }
}

fn run_fetch(args: &FetchArgs) -> Result<()> {
    let clinc = args.dataset == "clinc150";
    let movielens = args.dataset == "movielens-1m";
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("data").join(&args.dataset));
    let base_url = args.base_url.clone().unwrap_or_else(|| {
        if clinc {
            CLINC150_BASE_URL
        } else if movielens {
            MOVIELENS_BASE_URL
        } else {
            OMNIGLOT_BASE_URL
        }
        .to_string()
    });
    let mut files = if clinc {
        clinc150_files()
    } else if movielens {
        movielens_1m_files()
    } else {
        omniglot_files()
    };
    if !args.only.is_empty() {
        let known: Vec<String> = files.iter().map(|f| f.file_name().to_string()).collect();
        if let Some(bad) = args.only.iter().find(|o| !known.contains(o)) {
            return Err(Error::Config(format!(
                "--only {bad}: not a file of {}; choose from {}",
                args.dataset,
                known.join(", ")
            )));
        }
        files.retain(|f| args.only.iter().any(|o| o == f.file_name()));
    }
    let options = FetchOptions {
        progress: !args.quiet && !args.json && crate::console::stderr_is_terminal(),
        ..FetchOptions::default()
    };
    // The licence comes before the download; it is recorded as shown once the download is
    // complete, so a failed download leaves nothing behind.
    let licence_due = movielens && licence_notice_due(&dir);
    if licence_due {
        if args.json {
            eprintln!("{MOVIELENS_LICENCE}");
        } else {
            println!("{MOVIELENS_LICENCE}");
        }
    }
    let fetched = fetch_files(&base_url, &dir, &files, &options)?;
    if licence_due {
        record_licence_notice(&dir)?;
    }
    let mut extracted = None;
    for file in &fetched {
        let action = if file.downloaded {
            format!("downloaded {} bytes", file.bytes)
        } else {
            "already present, not downloaded again".to_string()
        };
        let check = match &file.verification {
            Verification::Md5 { md5 } => format!("md5 {md5} matches"),
            Verification::ValidZip { md5, entries } => format!(
                "no published md5 (this one is {md5}); checked that it is a non-empty, valid \
                 zip archive ({entries} entries)"
            ),
        };
        if !args.json {
            println!("{}: {action}; {check}", file.path.display());
        }
        if file.name == "all_runs.zip" && !args.no_extract {
            let dest = dir.join("all_runs");
            let count = extract_zip(&file.path, &dest)?;
            if !args.json {
                println!(
                    "unpacked {count} files into {} (use it with `metalearn eval-runs --runs {}`)",
                    dest.display(),
                    dest.display()
                );
            }
            extracted = Some(dest);
        }
    }
    let mut csv_files = Vec::new();
    if clinc && fetched.len() == files.len() && files.len() == clinc150_files().len() {
        let counts = write_clinc150_csvs(&dir, &dir)?;
        for (name, in_scope, out_of_scope) in &counts.files {
            if !args.json {
                println!(
                    "wrote {}: {in_scope} in-scope rows, {out_of_scope} out-of-scope rows \
                     (columns text,intent,domain)",
                    dir.join(name).display()
                );
            }
            csv_files.push(dir.join(name).display().to_string());
        }
    }
    let mut row_counts = None;
    if movielens {
        let summary = convert_movielens_1m(&dir.join(MOVIELENS_1M_ZIP), &dir)?;
        let rows = [
            (summary.users, "users", "user,gender,age,occupation,zip"),
            (summary.items, "movies", "item,title,year,genres"),
            (summary.ratings, "ratings", "user,item,rating,timestamp"),
        ];
        for (path, (count, what, columns)) in summary.files.iter().zip(rows) {
            if !args.json {
                println!(
                    "wrote {}: {count} {what} (columns {columns})",
                    path.display()
                );
            }
            csv_files.push(path.display().to_string());
        }
        row_counts = Some(json!({
            "users": summary.users,
            "items": summary.items,
            "ratings": summary.ratings,
        }));
    }
    if args.json {
        println!(
            "{}",
            json!({
                "counts": row_counts,
                "csv_files": csv_files,
                "command": "data fetch",
                "dataset": args.dataset,
                "dir": dir.display().to_string(),
                "files": fetched,
                "runs_folder": extracted.map(|p| p.display().to_string()),
            })
        );
    }
    Ok(())
}
