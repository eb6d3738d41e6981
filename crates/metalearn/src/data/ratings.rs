//! Recommender data from CSV: ratings (user, item, rating, optional partition), user features
//! and item features, read into memory with every feature cell encoded as the input slots of a
//! [`Layer::FeatureEmbedding`](crate::nn::architecture::Layer) (item fields first, then user
//! fields). Cold-start partitions come from a column or are derived (a seeded fraction of new
//! users, a condition on an item column for new items).
//!
//! The layout is the one `metalearn data fetch movielens-1m` writes: `ratings.csv`
//! (`user,item,rating[,timestamp][,partition]`), `users.csv` (`user,...`) and `items.csv`
//! (`item,...`); column names and which feature columns to use come from [`RatingsConfig`].
//! Bad input is an error naming the file, line and column (or the ids and their count), never a
//! panic or a silently dropped row.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::architecture::{FeatureField, FeatureKind};

/// The partitions of the cold-start protocol, in their protocol order (index = position).
pub const PARTITIONS: [&str; 4] = ["warm", "user_cold", "item_cold", "user_item_cold"];

/// What to do with a second rating of the same (user, item) pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Duplicates {
    /// Keep every row (MeLU's split keeps its 4 repeated pairs).
    #[default]
    Keep,
    /// The last row in the file wins.
    Last,
    /// A repeated pair is an error.
    Error,
}

/// `[task.ratings]`: where the files are and how to read them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatingsConfig {
    /// Ratings file, relative to `task.data` (default `ratings.csv`).
    #[serde(default = "default_ratings_file")]
    pub ratings_file: String,
    /// User features file (default `users.csv`; `""` for none).
    #[serde(default = "default_users_file")]
    pub users_file: String,
    /// Item features file (default `items.csv`; `""` for none).
    #[serde(default = "default_items_file")]
    pub items_file: String,
    /// Column of user ids (in the ratings and the user file).
    #[serde(default = "default_user_column")]
    pub user_column: String,
    /// Column of item ids (in the ratings and the item file).
    #[serde(default = "default_item_column")]
    pub item_column: String,
    /// Column of ratings.
    #[serde(default = "default_rating_column")]
    pub rating_column: String,
    /// Column naming each rating's partition (`warm`, `user_cold`, `item_cold`,
    /// `user_item_cold`); used when the ratings file has it.
    #[serde(default = "default_partition_column")]
    pub partition_column: String,
    /// Lowest and highest valid rating.
    #[serde(default = "default_scale")]
    pub scale: [f64; 2],
    /// Repeated (user, item) pairs: `keep`, `last` or `error`.
    #[serde(default)]
    pub duplicates: Duplicates,
    /// Users or items missing from the feature files take the "unknown" embedding of every
    /// field instead of being an error.
    #[serde(default)]
    pub allow_unknown_ids: bool,
    /// Categorical user columns (one value per cell).
    #[serde(default)]
    pub user_categorical: Vec<String>,
    /// Multi-valued user columns (`a|b|c`).
    #[serde(default)]
    pub user_multi_valued: Vec<String>,
    /// Numeric user columns.
    #[serde(default)]
    pub user_numeric: Vec<String>,
    /// Categorical item columns.
    #[serde(default)]
    pub item_categorical: Vec<String>,
    /// Multi-valued item columns.
    #[serde(default)]
    pub item_multi_valued: Vec<String>,
    /// Numeric item columns.
    #[serde(default)]
    pub item_numeric: Vec<String>,
    /// Feature columns whose embedding tables start at zero instead of at random: id columns
    /// (e.g. `item` listed in `item_categorical`), whose rows for ids never rated in training
    /// then add nothing.
    #[serde(default)]
    pub zero_init: Vec<String>,
    /// Width of every embedding.
    #[serde(default = "default_embedding_dim")]
    pub embedding_dim: usize,
    /// Without a partition column: the fraction of users held out as new users (seeded by
    /// `split_seed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_users: Option<f64>,
    /// Without a partition column: new items are those meeting this condition on a numeric
    /// item column, e.g. `"year >= 1998"` (operators `>=`, `>`, `<=`, `<`, `==`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_items: Option<String>,
    /// Feature columns of the lists above that a file lacks are left out (reported) instead
    /// of being an error: one config then serves files with more or fewer feature columns
    /// (MovieLens as downloaded, MeLU's split with directors and actors).
    #[serde(default)]
    pub skip_missing_features: bool,
    /// Seed of the new-user draw.
    #[serde(default)]
    pub split_seed: u64,
    /// Fewest ratings a user needs in a partition to be a task (support + query).
    #[serde(default = "default_min_ratings")]
    pub min_ratings: usize,
    /// Most ratings a user may have in a partition to be a task.
    #[serde(default = "default_max_ratings")]
    pub max_ratings: usize,
    /// Query ratings per user (the rest is the support set).
    #[serde(default = "default_query")]
    pub query: usize,
}

fn default_ratings_file() -> String {
    "ratings.csv".into()
}
fn default_users_file() -> String {
    "users.csv".into()
}
fn default_items_file() -> String {
    "items.csv".into()
}
fn default_user_column() -> String {
    "user".into()
}
fn default_item_column() -> String {
    "item".into()
}
fn default_rating_column() -> String {
    "rating".into()
}
fn default_partition_column() -> String {
    "partition".into()
}
fn default_scale() -> [f64; 2] {
    [1.0, 5.0]
}
fn default_embedding_dim() -> usize {
    32
}
fn default_min_ratings() -> usize {
    13
}
fn default_max_ratings() -> usize {
    100
}
fn default_query() -> usize {
    10
}

impl Default for RatingsConfig {
    fn default() -> Self {
        Self {
            ratings_file: default_ratings_file(),
            users_file: default_users_file(),
            items_file: default_items_file(),
            user_column: default_user_column(),
            item_column: default_item_column(),
            rating_column: default_rating_column(),
            partition_column: default_partition_column(),
            scale: default_scale(),
            duplicates: Duplicates::Keep,
            allow_unknown_ids: false,
            user_categorical: Vec::new(),
            user_multi_valued: Vec::new(),
            user_numeric: Vec::new(),
            item_categorical: Vec::new(),
            item_multi_valued: Vec::new(),
            item_numeric: Vec::new(),
            zero_init: Vec::new(),
            embedding_dim: default_embedding_dim(),
            new_users: None,
            new_items: None,
            skip_missing_features: false,
            split_seed: 0,
            min_ratings: default_min_ratings(),
            max_ratings: default_max_ratings(),
            query: default_query(),
        }
    }
}

impl RatingsConfig {
    /// MovieLens-1M as MeLU reads it: the columns `data fetch movielens-1m` and MeLU's split
    /// write (`rate`, `directors` and `actors` are used only where the item file has them).
    pub fn movielens() -> Self {
        Self {
            user_categorical: ["gender", "age", "occupation", "zip"]
                .map(String::from)
                .to_vec(),
            item_categorical: vec!["rate".into()],
            item_multi_valued: ["genres", "directors", "actors"].map(String::from).to_vec(),
            ..Self::default()
        }
    }

    /// Checks the values; the problem names the key under `task.ratings`.
    pub fn check(&self) -> std::result::Result<(), (String, String)> {
        let problem = |k: &str, m: String| Err((format!("task.ratings.{k}"), m));
        let [lo, hi] = self.scale;
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return problem(
                "scale",
                format!(
                    "`scale` must be [low, high] with low < high, got {:?}",
                    self.scale
                ),
            );
        }
        if self.embedding_dim == 0 {
            return problem("embedding_dim", "`embedding_dim` must be at least 1".into());
        }
        if self.query == 0 {
            return problem("query", "`query` must be at least 1 rating per user".into());
        }
        if self.min_ratings <= self.query {
            return problem(
                "min_ratings",
                format!(
                    "`min_ratings` ({}) must exceed `query` ({}) so that every user keeps a support set",
                    self.min_ratings, self.query
                ),
            );
        }
        if self.max_ratings < self.min_ratings {
            return problem(
                "max_ratings",
                format!(
                    "`max_ratings` ({}) is below `min_ratings` ({})",
                    self.max_ratings, self.min_ratings
                ),
            );
        }
        if let Some(f) = self.new_users {
            if !(f > 0.0 && f < 1.0) {
                return problem(
                    "new_users",
                    format!("`new_users` is a fraction in (0, 1), got {f}"),
                );
            }
        }
        if let Some(c) = &self.new_items {
            if let Err(e) = Condition::parse(c) {
                return problem("new_items", e);
            }
        }
        Ok(())
    }
}

/// `column OP number`, a condition on a numeric item column.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    column: String,
    op: String,
    value: f64,
}

impl Condition {
    /// Parses `"year >= 1998"`.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        for op in [">=", "<=", "==", ">", "<"] {
            if let Some((column, value)) = text.split_once(op) {
                let column = column.trim().to_string();
                let value: f64 = value.trim().parse().map_err(|_| {
                    format!(
                        "`{text}`: `{}` is not a number; write e.g. \"year >= 1998\"",
                        value.trim()
                    )
                })?;
                if column.is_empty() {
                    break;
                }
                return Ok(Self {
                    column,
                    op: op.into(),
                    value,
                });
            }
        }
        Err(format!(
            "`{text}` is not a condition; write `COLUMN OP NUMBER` with OP one of >=, >, <=, <, ==, \
             e.g. \"year >= 1998\""
        ))
    }

    fn holds(&self, v: f64) -> bool {
        match self.op.as_str() {
            ">=" => v >= self.value,
            "<=" => v <= self.value,
            "==" => v == self.value,
            ">" => v > self.value,
            _ => v < self.value,
        }
    }
}

/// One rating.
#[derive(Clone, Debug, PartialEq)]
pub struct Rating {
    /// User id as written in the file.
    pub user: String,
    /// Item id as written in the file.
    pub item: String,
    /// The rating.
    pub rating: f32,
    /// Index into [`PARTITIONS`].
    pub partition: usize,
}

/// A table of encoded feature slots, one row per id.
#[derive(Clone, Debug, Default)]
pub struct FeatureTable {
    /// Row of each id.
    pub index: HashMap<String, usize>,
    /// Ids in row order.
    pub ids: Vec<String>,
    /// `rows × slots` encoded values (ids of the vocabularies, -1 for an empty slot, numbers).
    pub slots: Vec<f32>,
    /// Slots per row.
    pub width: usize,
    /// Numeric columns per row (their raw values), for partition conditions.
    pub numbers: HashMap<String, Vec<f64>>,
}

impl FeatureTable {
    /// The encoded slots of `id`, or `None` when it has no row.
    pub fn row(&self, id: &str) -> Option<&[f32]> {
        self.index
            .get(id)
            .map(|&r| &self.slots[r * self.width..(r + 1) * self.width])
    }
}

/// What loading found and did, for reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadReport {
    /// Ratings read.
    pub ratings: usize,
    /// Repeated (user, item) pairs found.
    pub duplicate_pairs: usize,
    /// Rows dropped because a later row of the same pair won (`duplicates = "last"`).
    pub duplicates_dropped: usize,
    /// Rated users with no row in the user file (given the unknown embedding).
    pub unknown_users: usize,
    /// Rated items with no row in the item file (given the unknown embedding).
    pub unknown_items: usize,
    /// Where the partitions came from.
    pub partitions_from: String,
}

/// A recommender data set in memory.
#[derive(Clone, Debug)]
pub struct RatingsData {
    /// Every rating, in file order.
    pub ratings: Vec<Rating>,
    /// The fields of the feature embedding: item fields, then user fields.
    pub fields: Vec<FeatureField>,
    /// Vocabulary of each field (empty for numeric): value `v` has id `1 + position`; id 0
    /// is "unknown".
    pub vocabularies: Vec<Vec<String>>,
    /// Encoded item features (item slots of `fields`).
    pub items: FeatureTable,
    /// Encoded user features (user slots of `fields`).
    pub users: FeatureTable,
    /// The rating scale.
    pub scale: [f64; 2],
    /// What loading found.
    pub report: LoadReport,
    /// How many of `fields` are item fields (they come first).
    pub item_fields: usize,
}

impl RatingsData {
    /// The mean warm rating (the middle of the scale when there is none): the global-mean
    /// predictor, and where a recommender's head starts.
    pub fn warm_mean(&self) -> f64 {
        let (total, count) = self
            .ratings
            .iter()
            .filter(|r| r.partition == 0)
            .fold((0.0, 0usize), |(t, n), r| (t + r.rating as f64, n + 1));
        if count > 0 {
            total / count as f64
        } else {
            (self.scale[0] + self.scale[1]) / 2.0
        }
    }

    /// Input slots per example (item slots, then user slots).
    pub fn slots(&self) -> usize {
        self.items.width + self.users.width
    }

    /// The input row of (user, item): item slots then user slots. An id without a feature row
    /// takes the unknown slots (id 0 for categorical fields, empty multi-valued cells, 0).
    pub fn encode(&self, user: &str, item: &str, out: &mut Vec<f32>) {
        let unknown = |fields: &[FeatureField], out: &mut Vec<f32>| {
            for f in fields {
                match f.kind {
                    FeatureKind::Categorical | FeatureKind::Numeric => out.push(0.0),
                    FeatureKind::MultiValued => out.extend(std::iter::repeat_n(-1.0, f.slots)),
                }
            }
        };
        let item_fields = self.item_fields;
        match self.items.row(item) {
            Some(row) => out.extend_from_slice(row),
            None => unknown(&self.fields[..item_fields], out),
        }
        match self.users.row(user) {
            Some(row) => out.extend_from_slice(row),
            None => unknown(&self.fields[item_fields..], out),
        }
    }
}

impl RatingsData {
    /// The user slots of a user described by `values` (column → cell), with this data's
    /// vocabularies: a value never seen takes the unknown id, a missing column the unknown
    /// slots; a numeric cell that is no number is an error naming the column.
    pub fn encode_user(&self, values: &HashMap<String, String>) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for (k, field) in self.fields.iter().enumerate().skip(self.item_fields) {
            let column = field.name.strip_prefix("user_").unwrap_or(&field.name);
            let cell = values.get(column).map(|v| v.trim());
            let vocab = &self.vocabularies[k];
            let id = |v: &str| {
                vocab
                    .binary_search_by(|s| s.as_str().cmp(v))
                    .map_or(0, |i| i + 1)
            };
            match field.kind {
                FeatureKind::Numeric => out.push(match cell {
                    None => 0.0,
                    Some(c) => c.parse::<f32>().map_err(|_| {
                        Error::Data(format!("user feature `{column}`: `{c}` is not a number"))
                    })?,
                }),
                FeatureKind::Categorical => out.push(cell.map_or(0, id) as f32),
                FeatureKind::MultiValued => {
                    let values = cell.map(split_multi).unwrap_or_default();
                    let ids: Vec<f32> = values
                        .iter()
                        .take(field.slots)
                        .map(|v| id(v) as f32)
                        .collect();
                    let n = ids.len();
                    out.extend(ids);
                    out.extend(std::iter::repeat_n(-1.0, field.slots - n));
                }
            }
        }
        Ok(out)
    }
}

/// One user's ratings for `recommend`: a CSV file with `config`'s item and rating columns. A
/// rating that is not a number within the scale, or an empty item id, is an error naming the
/// line.
pub fn read_user_ratings(path: &Path, config: &RatingsConfig) -> Result<Vec<(String, f32)>> {
    let table = Table::read(path)?;
    let item_col = table.column(&config.item_column, "item ids")?;
    let rating_col = table.column(&config.rating_column, "ratings")?;
    let [lo, hi] = config.scale;
    (0..table.rows.len())
        .map(|r| {
            let item = table.cell(r, item_col);
            if item.is_empty() {
                return Err(Error::Data(format!("{}: empty id", table.at(r, item_col))));
            }
            let text = table.cell(r, rating_col);
            let rating = text
                .parse::<f64>()
                .ok()
                .filter(|v| (lo..=hi).contains(v))
                .ok_or_else(|| {
                    Error::Data(format!(
                        "{}: `{text}` is not a rating in [{lo}, {hi}]",
                        table.at(r, rating_col)
                    ))
                })?;
            Ok((item.to_string(), rating as f32))
        })
        .collect()
}

/// One user's features for `recommend`: a CSV file with a header and exactly one row, as a map
/// from column to cell.
pub fn read_user_features(path: &Path) -> Result<HashMap<String, String>> {
    let table = Table::read(path)?;
    if table.rows.len() != 1 {
        return Err(Error::Data(format!(
            "{}: needs exactly one row of user features, has {}",
            path.display(),
            table.rows.len()
        )));
    }
    Ok((0..table.header.len())
        .map(|c| (table.header[c].clone(), table.cell(0, c).to_string()))
        .collect())
}

/// One CSV file read whole: header and rows, with the file name for errors.
struct Table {
    path: PathBuf,
    header: Vec<String>,
    rows: Vec<::csv::StringRecord>,
}

impl Table {
    fn read(path: &Path) -> Result<Self> {
        let mut reader = ::csv::ReaderBuilder::new()
            .flexible(false)
            .from_path(path)
            .map_err(|e| csv_error(path, e))?;
        let header = reader
            .headers()
            .map_err(|e| csv_error(path, e))?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        let rows = reader
            .records()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| csv_error(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            header,
            rows,
        })
    }

    fn column(&self, name: &str, what: &str) -> Result<usize> {
        self.header.iter().position(|h| h == name).ok_or_else(|| {
            let known: Vec<&str> = self.header.iter().map(String::as_str).collect();
            let hint = crate::config::suggest::did_you_mean(name, &known);
            Error::Data(format!(
                "{}: no column `{name}` ({what}){hint}; its columns are {}",
                self.path.display(),
                known.join(", ")
            ))
        })
    }

    /// Line number in the file of row `r` (the header is line 1).
    fn line(&self, r: usize) -> u64 {
        self.rows[r].position().map_or(r as u64 + 2, |p| p.line())
    }

    fn cell(&self, r: usize, c: usize) -> &str {
        self.rows[r].get(c).unwrap_or("").trim()
    }

    fn at(&self, r: usize, c: usize) -> String {
        format!(
            "{}:{}: column `{}`",
            self.path.display(),
            self.line(r),
            self.header[c]
        )
    }
}

fn csv_error(path: &Path, e: ::csv::Error) -> Error {
    let at = e
        .position()
        .map(|p| format!(":{}", p.line()))
        .unwrap_or_default();
    Error::Data(format!("{}{at}: {e}", path.display()))
}

/// The feature columns of one side (user or item) and their kinds, in embedding order.
fn side_columns<'a>(
    categorical: &'a [String],
    multi: &'a [String],
    numeric: &'a [String],
) -> Vec<(&'a str, FeatureKind)> {
    categorical
        .iter()
        .map(|c| (c.as_str(), FeatureKind::Categorical))
        .chain(multi.iter().map(|c| (c.as_str(), FeatureKind::MultiValued)))
        .chain(numeric.iter().map(|c| (c.as_str(), FeatureKind::Numeric)))
        .collect()
}

fn split_multi(cell: &str) -> Vec<&str> {
    let mut values: Vec<&str> = cell
        .split('|')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    // A repeated value counts once (a multi-hot vector has no counts).
    let mut seen = BTreeSet::new();
    values.retain(|v| seen.insert(*v));
    values
}

/// Reads one feature file into fields, vocabularies and encoded rows. `prefix` (`item_` or
/// `user_`) names the fields.
fn read_features(
    path: &Path,
    id_column: &str,
    columns: &[(&str, FeatureKind)],
    prefix: &str,
    condition_column: Option<&str>,
    config: &RatingsConfig,
) -> Result<(Vec<FeatureField>, Vec<Vec<String>>, FeatureTable)> {
    let (dim, skip_missing, zero_init) = (
        config.embedding_dim,
        config.skip_missing_features,
        &config.zero_init,
    );
    let table = Table::read(path)?;
    let id_col = table.column(id_column, "the id column")?;
    let present: Vec<(&str, FeatureKind)>;
    let columns = if skip_missing {
        present = columns
            .iter()
            .copied()
            .filter(|(c, _)| table.header.iter().any(|h| h == c))
            .collect();
        &present[..]
    } else {
        columns
    };
    let cols: Vec<usize> = columns
        .iter()
        .map(|(c, _)| table.column(c, "a feature column of the config"))
        .collect::<Result<_>>()?;
    let mut fields = Vec::new();
    let mut vocabularies = Vec::new();
    for ((name, kind), &c) in columns.iter().zip(&cols) {
        let (vocab, slots) = match kind {
            FeatureKind::Numeric => (Vec::new(), 1),
            FeatureKind::Categorical => {
                let mut values = BTreeSet::new();
                for r in 0..table.rows.len() {
                    let v = table.cell(r, c);
                    if v.is_empty() {
                        return Err(Error::Data(format!(
                            "{}: empty cell; every categorical feature needs a value (write a \
                             placeholder such as `unknown`, or list the column as multi-valued, \
                             where an empty cell means no value)",
                            table.at(r, c)
                        )));
                    }
                    values.insert(v.to_string());
                }
                (values.into_iter().collect::<Vec<_>>(), 1)
            }
            FeatureKind::MultiValued => {
                let mut values = BTreeSet::new();
                let mut most = 1;
                for r in 0..table.rows.len() {
                    let cell = split_multi(table.cell(r, c));
                    most = most.max(cell.len());
                    values.extend(cell.into_iter().map(String::from));
                }
                (values.into_iter().collect::<Vec<_>>(), most)
            }
        };
        fields.push(FeatureField {
            name: format!("{prefix}{name}"),
            kind: *kind,
            vocab: if *kind == FeatureKind::Numeric {
                0
            } else {
                vocab.len() + 1
            },
            dim: if *kind == FeatureKind::Numeric {
                1
            } else {
                dim
            },
            slots,
            zero_init: zero_init.iter().any(|z| z == name),
        });
        vocabularies.push(vocab);
    }
    let width: usize = fields.iter().map(|f| f.slots).sum();
    let lookups: Vec<HashMap<&str, usize>> = vocabularies
        .iter()
        .map(|v| {
            v.iter()
                .enumerate()
                .map(|(i, s)| (s.as_str(), i + 1))
                .collect()
        })
        .collect();
    let mut out = FeatureTable {
        width,
        ..FeatureTable::default()
    };
    if let Some(column) = condition_column {
        let c = table.column(column, "the column of task.ratings.new_items")?;
        let mut values = Vec::with_capacity(table.rows.len());
        for r in 0..table.rows.len() {
            let cell = table.cell(r, c);
            values.push(cell.parse::<f64>().map_err(|_| {
                Error::Data(format!(
                    "{}: `{cell}` is not a number, and task.ratings.new_items compares it",
                    table.at(r, c)
                ))
            })?);
        }
        out.numbers.insert(column.to_string(), values);
    }
    for r in 0..table.rows.len() {
        let id = table.cell(r, id_col);
        if id.is_empty() {
            return Err(Error::Data(format!("{}: empty id", table.at(r, id_col))));
        }
        if out.index.insert(id.to_string(), out.ids.len()).is_some() {
            return Err(Error::Data(format!(
                "{}: id `{id}` has a second row; each id needs exactly one",
                table.at(r, id_col)
            )));
        }
        out.ids.push(id.to_string());
        for (k, (field, &c)) in fields.iter().zip(&cols).enumerate() {
            let cell = table.cell(r, c);
            match field.kind {
                FeatureKind::Numeric => {
                    let v: f64 = cell
                        .parse()
                        .ok()
                        .filter(|v: &f64| v.is_finite())
                        .ok_or_else(|| {
                            Error::Data(format!(
                                "{}: `{cell}` is not a number; numeric features need a number in \
                             every row (list the column as categorical if it holds labels)",
                                table.at(r, c)
                            ))
                        })?;
                    out.slots.push(v as f32);
                }
                FeatureKind::Categorical => out.slots.push(lookups[k][cell] as f32),
                FeatureKind::MultiValued => {
                    let values = split_multi(cell);
                    out.slots
                        .extend(values.iter().map(|v| lookups[k][v] as f32));
                    out.slots
                        .extend(std::iter::repeat_n(-1.0, field.slots - values.len()));
                }
            }
        }
    }
    Ok((fields, vocabularies, out))
}

/// Reads `dir`'s ratings and feature files as `config` says.
pub fn load_ratings(dir: &Path, config: &RatingsConfig) -> Result<RatingsData> {
    config
        .check()
        .map_err(|(key, message)| Error::Config(format!("{key}: {message}")))?;
    if !dir.is_dir() {
        return Err(Error::Data(format!(
            "{}: no such folder; recommendation data is a folder with {}, {} and {} \
             (`metalearn data fetch movielens-1m` writes one)",
            dir.display(),
            config.ratings_file,
            config.users_file,
            config.items_file
        )));
    }
    let empty = (Vec::new(), Vec::new(), FeatureTable::default());
    let item_columns = side_columns(
        &config.item_categorical,
        &config.item_multi_valued,
        &config.item_numeric,
    );
    let user_columns = side_columns(
        &config.user_categorical,
        &config.user_multi_valued,
        &config.user_numeric,
    );
    // The column of the new-item condition, read only when the partitions are derived.
    let has_partition_column = std::fs::File::open(dir.join(&config.ratings_file))
        .ok()
        .and_then(|f| {
            ::csv::Reader::from_reader(f)
                .headers()
                .ok()
                .map(|h| h.iter().any(|c| c.trim() == config.partition_column))
        })
        .unwrap_or(false);
    let condition_column = match (&config.new_items, has_partition_column) {
        (Some(text), false) => Some(Condition::parse(text).map_err(Error::Config)?.column),
        _ => None,
    };
    let (item_fields, item_vocab, items) = if config.items_file.is_empty() {
        empty.clone()
    } else {
        read_features(
            &dir.join(&config.items_file),
            &config.item_column,
            &item_columns,
            "item_",
            condition_column.as_deref(),
            config,
        )?
    };
    let (user_fields, user_vocab, users) = if config.users_file.is_empty() {
        empty
    } else {
        read_features(
            &dir.join(&config.users_file),
            &config.user_column,
            &user_columns,
            "user_",
            None,
            config,
        )?
    };
    let item_field_count = item_fields.len();
    let mut fields = item_fields;
    fields.extend(user_fields);
    if fields.is_empty() {
        return Err(Error::Config(
            "task.ratings lists no feature columns: name at least one in user_categorical, \
             item_categorical, item_multi_valued, ... (the model embeds features, not ids)"
                .into(),
        ));
    }
    let mut vocabularies = item_vocab;
    vocabularies.extend(user_vocab);

    let table = Table::read(&dir.join(&config.ratings_file))?;
    let user_col = table.column(&config.user_column, "user ids")?;
    let item_col = table.column(&config.item_column, "item ids")?;
    let rating_col = table.column(&config.rating_column, "ratings")?;
    let partition_col = table
        .header
        .iter()
        .position(|h| *h == config.partition_column);
    let [lo, hi] = config.scale;
    let mut ratings = Vec::with_capacity(table.rows.len());
    for r in 0..table.rows.len() {
        let user = table.cell(r, user_col);
        let item = table.cell(r, item_col);
        for (v, c) in [(user, user_col), (item, item_col)] {
            if v.is_empty() {
                return Err(Error::Data(format!("{}: empty id", table.at(r, c))));
            }
        }
        let text = table.cell(r, rating_col);
        let rating: f64 = text.parse().map_err(|_| {
            Error::Data(format!(
                "{}: `{text}` is not a number; every rating must be a number in [{lo}, {hi}]",
                table.at(r, rating_col)
            ))
        })?;
        if !(lo..=hi).contains(&rating) {
            return Err(Error::Data(format!(
                "{}: rating {rating} is outside the scale [{lo}, {hi}] (task.ratings.scale); \
                 fix the row or the scale",
                table.at(r, rating_col)
            )));
        }
        let partition = match partition_col {
            Some(c) => {
                let p = table.cell(r, c);
                PARTITIONS.iter().position(|&q| q == p).ok_or_else(|| {
                    Error::Data(format!(
                        "{}: unknown partition `{p}`; use one of {}",
                        table.at(r, c),
                        PARTITIONS.join(", ")
                    ))
                })?
            }
            None => 0,
        };
        ratings.push(Rating {
            user: user.into(),
            item: item.into(),
            rating: rating as f32,
            partition,
        });
    }
    let mut report = LoadReport {
        ratings: ratings.len(),
        ..LoadReport::default()
    };

    // Repeated pairs.
    let mut last: HashMap<(&str, &str), usize> = HashMap::new();
    let mut repeated = Vec::new();
    for (i, r) in ratings.iter().enumerate() {
        if let Some(prev) = last.insert((r.user.as_str(), r.item.as_str()), i) {
            repeated.push((prev, i));
        }
    }
    report.duplicate_pairs = repeated.len();
    if !repeated.is_empty() {
        match config.duplicates {
            Duplicates::Keep => {}
            Duplicates::Error => {
                let (_, i) = repeated[0];
                return Err(Error::Data(format!(
                    "{}:{}: user `{}` rated item `{}` again ({} repeated pairs in all); set \
                     task.ratings.duplicates = \"keep\" or \"last\" to accept them",
                    table.path.display(),
                    table.line(i),
                    ratings[i].user,
                    ratings[i].item,
                    repeated.len()
                )));
            }
            Duplicates::Last => {
                let dropped: BTreeSet<usize> = repeated.iter().map(|&(prev, _)| prev).collect();
                report.duplicates_dropped = dropped.len();
                let mut i = 0;
                ratings.retain(|_| {
                    i += 1;
                    !dropped.contains(&(i - 1))
                });
            }
        }
    }

    // Ids without features.
    let missing = |ids: Vec<&str>, t: &FeatureTable, file: &str, what: &str| -> Result<usize> {
        if file.is_empty() {
            return Ok(0);
        }
        let mut absent: Vec<&str> = ids
            .into_iter()
            .filter(|id| !t.index.contains_key(*id))
            .collect();
        absent.sort_unstable();
        absent.dedup();
        if !absent.is_empty() && !config.allow_unknown_ids {
            let shown: Vec<&str> = absent.iter().take(5).copied().collect();
            return Err(Error::Data(format!(
                "{} {what}s of {} have no row in {} (e.g. {}); add their rows, or set \
                 task.ratings.allow_unknown_ids = true to give them a learned \"unknown\" embedding",
                absent.len(),
                table.path.display(),
                dir.join(file).display(),
                shown.join(", ")
            )));
        }
        Ok(absent.len())
    };
    report.unknown_users = missing(
        ratings.iter().map(|r| r.user.as_str()).collect(),
        &users,
        &config.users_file,
        "user",
    )?;
    report.unknown_items = missing(
        ratings.iter().map(|r| r.item.as_str()).collect(),
        &items,
        &config.items_file,
        "item",
    )?;

    // Derived partitions.
    report.partitions_from = if partition_col.is_some() {
        // The file's own partitions win over derived ones.
        format!("column `{}`", config.partition_column)
    } else if config.new_users.is_some() || config.new_items.is_some() {
        derive_partitions(&mut ratings, config, &items)?;
        let mut how = Vec::new();
        if let Some(f) = config.new_users {
            how.push(format!(
                "new users: a fraction {f} (seed {})",
                config.split_seed
            ));
        }
        if let Some(c) = &config.new_items {
            how.push(format!("new items: {c}"));
        }
        how.join("; ")
    } else {
        "none: every rating is warm".into()
    };
    Ok(RatingsData {
        ratings,
        fields,
        vocabularies,
        items,
        users,
        scale: config.scale,
        report,
        item_fields: item_field_count,
    })
}

/// [`load_ratings`], read once per process for each folder and configuration (meta-training
/// builds the task source and the network from the same data).
pub fn load_ratings_cached(
    dir: &Path,
    config: &RatingsConfig,
) -> Result<std::sync::Arc<RatingsData>> {
    type Cache = std::sync::Mutex<HashMap<(PathBuf, String), std::sync::Arc<RatingsData>>>;
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let key = (
        dir.to_path_buf(),
        serde_json::to_string(config).unwrap_or_default(),
    );
    let cache = CACHE.get_or_init(Default::default);
    if let Some(data) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(data);
    }
    let data = std::sync::Arc::new(load_ratings(dir, config)?);
    if let Ok(mut c) = cache.lock() {
        c.insert(key, data.clone());
    }
    Ok(data)
}

fn derive_partitions(
    ratings: &mut [Rating],
    config: &RatingsConfig,
    items: &FeatureTable,
) -> Result<()> {
    let mut new_users = std::collections::HashSet::new();
    if let Some(fraction) = config.new_users {
        let users: BTreeSet<&str> = ratings.iter().map(|r| r.user.as_str()).collect();
        let mut users: Vec<&str> = users.into_iter().collect();
        let mut rng = SplitMix64::new(config.split_seed ^ 0x6e65_775f_7573_6572);
        for i in (1..users.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            users.swap(i, j);
        }
        let count = ((users.len() as f64) * fraction).round() as usize;
        new_users = users[..count].iter().map(|u| u.to_string()).collect();
    }
    let mut new_items = std::collections::HashSet::new();
    if let Some(text) = &config.new_items {
        let condition = Condition::parse(text).map_err(Error::Config)?;
        let values = items.numbers.get(&condition.column).ok_or_else(|| {
            Error::Config(format!(
                "task.ratings.new_items compares `{}`, which needs an item file",
                condition.column
            ))
        })?;
        for (id, &v) in items.ids.iter().zip(values) {
            if condition.holds(v) {
                new_items.insert(id.clone());
            }
        }
    }
    for r in ratings.iter_mut() {
        let user_new = new_users.contains(&r.user);
        let item_new = new_items.contains(&r.item);
        r.partition = match (user_new, item_new) {
            (false, false) => 0,
            (true, false) => 1,
            (false, true) => 2,
            (true, true) => 3,
        };
    }
    Ok(())
}

/// SplitMix64 (Steele, Lea & Flood, 2014), the generator of the cold-start protocol.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting from `state`.
    pub fn new(state: u64) -> Self {
        Self { state }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The protocol's support/query split of one user's `n` ratings (positions in file order): a
/// Fisher–Yates shuffle from the top with a SplitMix64 seeded `seed·2^32 + partition·2^24 +
/// user`; the last `query` positions are the query set. Returns `(support, query)`.
pub fn split_user(
    n: usize,
    seed: u64,
    partition: usize,
    user: u64,
    query: usize,
) -> (Vec<usize>, Vec<usize>) {
    let mut rng = SplitMix64::new(
        (seed << 32)
            .wrapping_add((partition as u64) << 24)
            .wrapping_add(user),
    );
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    let query_start = n.saturating_sub(query);
    let q = idx.split_off(query_start);
    (idx, q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_protocol_check_values() {
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xe220a8397b1dcdaf);
        assert_eq!(rng.next_u64(), 0x6e789e6aa1b965f4);
        assert_eq!(rng.next_u64(), 0x06c45d188009454f);
    }

    #[test]
    fn split_keeps_every_position_once() {
        let (s, q) = split_user(40, 3, 1, 17, 10);
        assert_eq!(q.len(), 10);
        assert_eq!(s.len(), 30);
        let mut all: Vec<usize> = s.iter().chain(&q).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..40).collect::<Vec<_>>());
        assert_ne!(
            split_user(40, 4, 1, 17, 10).1,
            q,
            "another seed, another draw"
        );
    }

    #[test]
    fn conditions_parse_and_hold() {
        let c = Condition::parse("year >= 1998").unwrap();
        assert!(c.holds(1998.0) && !c.holds(1997.0));
        assert!(Condition::parse("year 1998").is_err());
        assert!(Condition::parse("year >= soon").is_err());
    }
}
