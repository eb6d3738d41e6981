//! Lists of image files with their labels, from a class-folder tree (`dir/<class>/<image>`)
//! or a CSV file with a path column (paths relative to the CSV's folder) and an optional
//! label column; and the seeded draw of K examples per class.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::data::csv::load_text_columns;
use crate::data::image_folder::list_image_folder;
use crate::error::{Error, Result};

/// Image files, and a label for each when the source has them.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageList {
    /// The folder or CSV file they came from, for messages.
    pub source: String,
    /// The folder relative paths are taken from (the data folder, or the CSV's folder).
    pub root: PathBuf,
    /// The image files.
    pub paths: Vec<PathBuf>,
    /// One label per image (a class folder's name, or the CSV's label cell).
    pub labels: Option<Vec<String>>,
}

impl ImageList {
    /// Reads a class-folder tree, or a CSV file (by extension) whose `path_column` names the
    /// images and whose `label_column`, when given, their classes.
    pub fn read(path: &Path, path_column: &str, label_column: Option<&str>) -> Result<Self> {
        if path.is_dir() {
            let (files, classes) = list_image_folder(path)?;
            return Ok(Self {
                source: path.display().to_string(),
                root: path.to_path_buf(),
                labels: Some(files.iter().map(|(_, c)| classes[*c].clone()).collect()),
                paths: files.into_iter().map(|(p, _)| p).collect(),
            });
        }
        if !path.exists() {
            return Err(Error::Data(format!(
                "{}: no such file or folder; give a folder with one sub-folder of images per \
                 class, or a CSV file with a `{path_column}` column",
                path.display()
            )));
        }
        let mut columns = vec![(path_column, "image path")];
        if let Some(label) = label_column {
            columns.push((label, "label"));
        }
        let rows = load_text_columns(path, &columns)?;
        if rows.is_empty() {
            return Err(Error::Data(format!("{}: no rows", path.display())));
        }
        let root = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let paths = rows.iter().map(|(_, cells)| root.join(&cells[0])).collect();
        let labels = label_column.map(|_| rows.iter().map(|(_, c)| c[1].clone()).collect());
        Ok(Self {
            source: path.display().to_string(),
            root,
            paths,
            labels,
        })
    }

    /// Every image file under `dir` (any depth, hidden entries skipped), sorted by path.
    pub fn tree(dir: &Path) -> Result<Self> {
        let mut paths = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(folder) = pending.pop() {
            let entries = std::fs::read_dir(&folder).map_err(|e| Error::io(&folder, e))?;
            for entry in entries {
                let path = entry.map_err(|e| Error::io(&folder, e))?.path();
                let hidden = path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'));
                if hidden {
                    continue;
                }
                if path.is_dir() {
                    pending.push(path);
                } else if crate::data::image_folder::has_image_extension(&path) {
                    paths.push(path);
                }
            }
        }
        paths.sort();
        if paths.is_empty() {
            return Err(Error::Data(format!(
                "{}: no .png, .jpg, .jpeg or .webp images found",
                dir.display()
            )));
        }
        Ok(Self {
            source: dir.display().to_string(),
            root: dir.to_path_buf(),
            paths,
            labels: None,
        })
    }

    /// Labels, or an error saying the source has none.
    pub fn labels(&self) -> Result<&[String]> {
        self.labels.as_deref().ok_or_else(|| {
            Error::Data(format!(
                "{}: the images have no labels; give a class-folder tree or a CSV label column",
                self.source
            ))
        })
    }

    /// The sorted distinct labels; at least two classes, each with an image.
    pub fn classes(&self) -> Result<Vec<String>> {
        let mut classes: Vec<String> = self.labels()?.to_vec();
        classes.sort();
        classes.dedup();
        if classes.len() < 2 {
            return Err(Error::Data(format!(
                "{}: {} class(es) found ({}); classification needs at least two",
                self.source,
                classes.len(),
                classes.join(", ")
            )));
        }
        Ok(classes)
    }

    /// The images at `rows`, in that order.
    pub fn select(&self, rows: &[usize]) -> Self {
        Self {
            source: self.source.clone(),
            root: self.root.clone(),
            paths: rows.iter().map(|&i| self.paths[i].clone()).collect(),
            labels: self
                .labels
                .as_ref()
                .map(|l| rows.iter().map(|&i| l[i].clone()).collect()),
        }
    }
}

/// `shots` rows of every label (labels in sorted order, rows shuffled with a generator seeded
/// by `seed`), skipping the label `skip`. A label with fewer rows is an error naming it.
pub fn draw_per_class(
    labels: &[String],
    shots: usize,
    seed: u64,
    skip: Option<&str>,
    source: &str,
) -> Result<Vec<usize>> {
    if shots == 0 {
        return Err(Error::Config("--shots-per-class must be at least 1".into()));
    }
    let mut by_class: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, label) in labels.iter().enumerate() {
        if Some(label.as_str()) != skip {
            by_class.entry(label).or_default().push(i);
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut chosen = Vec::with_capacity(by_class.len() * shots);
    for (class, mut rows) in by_class {
        if rows.len() < shots {
            return Err(Error::Data(format!(
                "{source}: class `{class}` has only {} rows, fewer than --shots-per-class {shots}",
                rows.len()
            )));
        }
        rows.shuffle(&mut rng);
        chosen.extend_from_slice(&rows[..shots]);
    }
    Ok(chosen)
}
