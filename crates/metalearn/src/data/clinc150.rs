//! CLINC150 (Larson et al., EMNLP 2019; CC BY 3.0): 150 intents in 10 domains, with
//! out-of-scope queries. [`clinc150_files`] lists the published files with their MD5s;
//! [`write_clinc150_csvs`] turns `data_full.json` and `domains.json` into `train.csv`, `val.csv`
//! and `test.csv` with columns `text,intent,domain` (out-of-scope rows: intent and domain `oos`),
//! which every text command reads like any other CSV.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::data::fetch::RemoteFile;
use crate::error::{Error, Result};
use crate::fsutil::atomic_write;
use crate::fsutil::read_json;

/// Where the CLINC150 files are published (the `clinc/oos-eval` repository, raw files).
pub const CLINC150_BASE_URL: &str = "https://raw.githubusercontent.com/clinc/oos-eval/master/data";

/// The label of out-of-scope queries.
pub const OUT_OF_SCOPE: &str = "oos";

/// `data_full.json` and `domains.json` with their MD5s.
pub fn clinc150_files() -> Vec<RemoteFile> {
    vec![
        RemoteFile::with_md5("data_full.json", "30c29dc6ab78edf3b5dfa640be204cde"),
        RemoteFile::with_md5("domains.json", "9beee9d0f36e07e914c1e3a626bdcb4a"),
    ]
}

#[derive(Deserialize)]
struct DataFull {
    train: Vec<(String, String)>,
    val: Vec<(String, String)>,
    test: Vec<(String, String)>,
    oos_train: Vec<(String, String)>,
    oos_val: Vec<(String, String)>,
    oos_test: Vec<(String, String)>,
}

/// Rows written per file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clinc150Counts {
    /// `(file name, in-scope rows, out-of-scope rows)`.
    pub files: Vec<(String, usize, usize)>,
}

/// Reads `data_full.json` and `domains.json` from `source` and writes `train.csv`, `val.csv`
/// and `test.csv` into `out` (each atomically).
pub fn write_clinc150_csvs(source: &Path, out: &Path) -> Result<Clinc150Counts> {
    let data: DataFull = read_json(&source.join("data_full.json"), "; fetch the file again")?;
    let domains: HashMap<String, Vec<String>> =
        read_json(&source.join("domains.json"), "; fetch the file again")?;
    let mut domain_of: HashMap<&str, &str> = HashMap::new();
    for (domain, intents) in &domains {
        for intent in intents {
            domain_of.insert(intent, domain);
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut counts = Vec::new();
    for (name, in_scope, out_of_scope) in [
        ("train.csv", &data.train, &data.oos_train),
        ("val.csv", &data.val, &data.oos_val),
        ("test.csv", &data.test, &data.oos_test),
    ] {
        let mut writer = ::csv::Writer::from_writer(Vec::new());
        let csv_error = |e: ::csv::Error| Error::Data(format!("cannot write {name}: {e}"));
        writer
            .write_record(["text", "intent", "domain"])
            .map_err(csv_error)?;
        for (text, intent) in in_scope {
            let domain = domain_of.get(intent.as_str()).ok_or_else(|| {
                Error::Data(format!(
                    "{}: intent `{intent}` is in no domain of domains.json",
                    source.join("data_full.json").display()
                ))
            })?;
            writer
                .write_record([text.as_str(), intent, domain])
                .map_err(csv_error)?;
        }
        for (text, _) in out_of_scope {
            writer
                .write_record([text.as_str(), OUT_OF_SCOPE, OUT_OF_SCOPE])
                .map_err(csv_error)?;
        }
        let bytes = writer
            .into_inner()
            .map_err(|e| Error::Data(format!("cannot write {name}: {e}")))?;
        atomic_write(&out.join(name), &bytes)?;
        counts.push((name.to_string(), in_scope.len(), out_of_scope.len()));
    }
    Ok(Clinc150Counts { files: counts })
}

/// The texts of one split (`train`, `val`, `test`, `oos_train`, `oos_val`, `oos_test`) of a
/// `data_full.json` file, in file order.
pub fn read_clinc150_split(path: &Path, split: &str) -> Result<Vec<String>> {
    let data: HashMap<String, Vec<(String, String)>> = read_json(path, "; fetch the file again")?;
    let rows = data.get(split).ok_or_else(|| {
        let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
        keys.sort();
        Error::Data(format!(
            "{}: no split `{split}` (the file has {})",
            path.display(),
            keys.join(", ")
        ))
    })?;
    Ok(rows.iter().map(|(text, _)| text.clone()).collect())
}
