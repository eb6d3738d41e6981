//! CSV files: one header row naming the columns, then one example per row.
//!
//! Every column but the target is a numeric feature. A target whose cells are all numbers is
//! kept as is (regression values or class ids); a target with any other cell is categorical: its
//! distinct values, sorted, become the class names and the ids are their positions.
//!
//! A UTF-8 byte-order mark, quoted fields (including ones spanning lines), CRLF line ends and
//! whitespace around cells are accepted. Everything else that is malformed is an error naming the
//! file, the line as counted in the file (the header is line 1) and the column, and saying what
//! to do.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};

use super::Dataset;
use crate::config::suggest::closest;
use crate::error::{Error, Result};

/// Reads a CSV file whose column `target` holds the labels; every other column is a feature.
pub fn load_csv(path: &Path, target: &str) -> Result<Dataset> {
    load_csv_with_classes(path, target, None)
}

/// Reads only the named feature columns, in the given order (for prediction: the file may lack
/// the target column and may hold extra columns, which are ignored).
pub fn load_csv_features(path: &Path, features: &[String]) -> Result<Tensor> {
    let table = Table::open(path)?;
    if features.is_empty() {
        return Err(Error::Config(format!(
            "{}: no feature columns were requested",
            table.file
        )));
    }
    let columns = features
        .iter()
        .map(|name| table.column_index(name, "feature"))
        .collect::<Result<Vec<_>>>()?;
    let parsed = table.read_rows(&columns, &[])?;
    Ok(Tensor::from_vec(
        parsed.features,
        (parsed.rows, columns.len()),
        &Device::Cpu,
    )?)
}

/// The cells of the named text columns, row by row (`rows[i][j]` is column `columns[j].0` of
/// data row `i`), with the line each row starts on. `columns[j].1` is the column's role in
/// messages (`text`, `label`). Missing columns are errors that list the
/// columns and suggest the closest name; empty cells and invalid UTF-8 name their line.
pub fn load_text_columns(path: &Path, columns: &[(&str, &str)]) -> Result<Vec<(u64, Vec<String>)>> {
    let table = Table::open(path)?;
    let indices = columns
        .iter()
        .map(|(name, role)| table.column_index(name, role))
        .collect::<Result<Vec<_>>>()?;
    let parsed = table.read_rows(&[], &indices)?;
    let width = indices.len().max(1);
    Ok(parsed
        .targets
        .chunks(width)
        .map(|cells| (cells[0].0, cells.iter().map(|(_, c)| c.clone()).collect()))
        .collect())
}

/// The column names of a CSV file's header, in file order.
pub fn column_names(path: &Path) -> Result<Vec<String>> {
    Ok(Table::open(path)?.header.clone())
}

/// Like [`load_csv`], but a categorical target is mapped through `class_names` (so that a test
/// file gets the same class ids as the training file); a class not in the list is an error naming
/// its line. With `None`, class names are taken from the file itself.
pub fn load_csv_with_classes(
    path: &Path,
    target: &str,
    class_names: Option<&[String]>,
) -> Result<Dataset> {
    let table = Table::open(path)?;
    let target_index = table.column_index(target, "target")?;
    let columns: Vec<usize> = (0..table.header.len())
        .filter(|&i| i != target_index)
        .collect();
    if columns.is_empty() {
        return Err(Error::Data(format!(
            "{}: the only column is the target `{target}`; add feature columns",
            table.file
        )));
    }
    let parsed = table.read_rows(&columns, &[target_index])?;
    let target_name = table.header[target_index].clone();
    let (y, class_names) = match class_names {
        Some(names) => (
            map_to_classes(&table.file, &target_name, &parsed.targets, names)?,
            Some(names.to_vec()),
        ),
        None => encode_target(&table.file, &target_name, &parsed.targets)?,
    };
    let x = Tensor::from_vec(parsed.features, (parsed.rows, columns.len()), &Device::Cpu)?;
    let y = Tensor::from_vec(y, parsed.rows, &Device::Cpu)?;
    Ok(Dataset {
        x,
        y,
        feature_names: columns.iter().map(|&i| table.header[i].clone()).collect(),
        target_name,
        class_names,
        source: path.display().to_string(),
    })
}

/// A CSV file read into memory with its header parsed.
struct Table {
    /// The path, for messages.
    file: String,
    /// The bytes after the byte-order mark.
    bytes: Vec<u8>,
    /// Column names, trimmed.
    header: Vec<String>,
}

/// The cells read from the data rows.
struct ParsedRows {
    rows: usize,
    /// Row-major `[rows, columns]`.
    features: Vec<f32>,
    /// The text cells of each row (the target, or text columns) with the row's line.
    targets: Vec<(u64, String)>,
}

impl Table {
    fn open(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let mut bytes = std::fs::read(path).map_err(|e| {
            Error::Data(format!(
                "{file}: cannot read the CSV file ({e}); check the path"
            ))
        })?;
        if let Some(kind) = binary_kind(&bytes) {
            return Err(Error::Data(format!(
                "{file}: this is not a CSV text file ({kind}); give a comma-separated text file \
                 with a header row"
            )));
        }
        if bytes.starts_with(UTF8_BOM) {
            bytes.drain(..UTF8_BOM.len());
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(Error::Data(format!(
                "{file}: the file is empty; a CSV file needs a header row naming the columns, \
                 then one row per example"
            )));
        }
        let mut reader = reader(&bytes);
        let mut record = ::csv::ByteRecord::new();
        let found = reader
            .read_byte_record(&mut record)
            .map_err(|e| csv_error(&file, &e))?;
        if !found {
            return Err(Error::Data(format!("{file}: the file has no header row")));
        }
        let line = line_of(&record);
        let mut header = Vec::with_capacity(record.len());
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, raw) in record.iter().enumerate() {
            let name = std::str::from_utf8(raw)
                .map_err(|_| {
                    Error::Data(format!(
                        "{file}, line {line}: the name of column {} is not valid UTF-8; save \
                         the file as UTF-8",
                        i + 1
                    ))
                })?
                .trim()
                .to_string();
            if name.is_empty() {
                return Err(Error::Data(format!(
                    "{file}, line {line}: column {} of the header has no name; name every \
                     column (the first row must be the header)",
                    i + 1
                )));
            }
            if let Some(first) = seen.insert(name.clone(), i) {
                return Err(Error::Data(format!(
                    "{file}, line {line}: column name `{name}` appears twice (columns {} and \
                     {}); rename one of them",
                    first + 1,
                    i + 1
                )));
            }
            header.push(name);
        }
        Ok(Self {
            file,
            bytes,
            header,
        })
    }

    /// The index of column `name`; an error lists the columns and suggests the closest name.
    fn column_index(&self, name: &str, role: &str) -> Result<usize> {
        let wanted = name.trim();
        if let Some(i) = self.header.iter().position(|h| h == wanted) {
            return Ok(i);
        }
        let header: Vec<&str> = self.header.iter().map(String::as_str).collect();
        let suggestion = closest(wanted, &header)
            .map(|c| format!("did you mean `{c}`? "))
            .unwrap_or_default();
        Err(Error::Data(format!(
            "{}: {role} column `{wanted}` not found; {suggestion}the columns are: {}",
            self.file,
            self.header
                .iter()
                .map(|h| format!("`{h}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// Reads every data row: `columns` are parsed as finite numbers, the cells of
    /// `text_columns` are kept as text (one entry of `targets` per cell, row by row).
    fn read_rows(&self, columns: &[usize], text_columns: &[usize]) -> Result<ParsedRows> {
        let file = &self.file;
        let mut reader = reader(&self.bytes);
        let mut record = ::csv::ByteRecord::new();
        // The header was validated in `open`.
        reader
            .read_byte_record(&mut record)
            .map_err(|e| csv_error(file, &e))?;
        let mut parsed = ParsedRows {
            rows: 0,
            features: Vec::new(),
            targets: Vec::new(),
        };
        while reader
            .read_byte_record(&mut record)
            .map_err(|e| csv_error(file, &e))?
        {
            let line = line_of(&record);
            if is_blank(&record) {
                continue;
            }
            if record.len() != self.header.len() {
                let (what, fix) = if record.len() < self.header.len() {
                    ("too few", "fill in the missing cells")
                } else {
                    (
                        "too many",
                        "remove the extra cells or quote cells that contain commas",
                    )
                };
                return Err(Error::Data(format!(
                    "{file}, line {line}: {what} fields: the row has {} but the header has {} \
                     columns; {fix}",
                    record.len(),
                    self.header.len()
                )));
            }
            for &c in columns {
                let cell = self.cell(&record, c, line)?;
                parsed.features.push(parse_finite(cell).map_err(|why| {
                    Error::Data(format!(
                        "{file}, line {line}, column `{}`: {why}; feature columns must \
                             hold finite numbers (drop or encode this column, or fix the cell)",
                        self.header[c]
                    ))
                })?);
            }
            for &t in text_columns {
                let cell = self.cell(&record, t, line)?;
                parsed.targets.push((line, cell.to_string()));
            }
            parsed.rows += 1;
        }
        if parsed.rows == 0 {
            return Err(Error::Data(format!(
                "{file}: the file has a header but no data rows; add one row per example"
            )));
        }
        Ok(parsed)
    }

    /// Cell `column` of a row, decoded and trimmed; empty cells are errors.
    fn cell<'r>(&self, record: &'r ::csv::ByteRecord, column: usize, line: u64) -> Result<&'r str> {
        let name = &self.header[column];
        let raw = record.get(column).unwrap_or_default();
        let text = std::str::from_utf8(raw).map_err(|_| {
            Error::Data(format!(
                "{}, line {line}, column `{name}`: the cell is not valid UTF-8 text; save the \
                 file as UTF-8",
                self.file
            ))
        })?;
        let text = text.trim();
        if text.is_empty() {
            return Err(Error::Data(format!(
                "{}, line {line}, column `{name}`: the cell is empty; fill in a value or remove \
                 the row",
                self.file
            )));
        }
        Ok(text)
    }
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// A CSV reader that leaves the header, field counts and trimming to this module, so that every
/// error can name its line and column.
fn reader(bytes: &[u8]) -> ::csv::Reader<&[u8]> {
    ::csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes)
}

/// Whether a record is a line holding only whitespace (skipped, like empty lines).
fn is_blank(record: &::csv::ByteRecord) -> bool {
    record.len() == 1 && record[0].iter().all(u8::is_ascii_whitespace)
}

/// The line (1-based, as counted in the file) where a record starts.
fn line_of(record: &::csv::ByteRecord) -> u64 {
    record.position().map_or(0, ::csv::Position::line)
}

fn csv_error(file: &str, e: &::csv::Error) -> Error {
    match e.position() {
        Some(pos) => Error::Data(format!(
            "{file}, line {}: cannot parse the CSV: {e}",
            pos.line()
        )),
        None => Error::Data(format!("{file}: cannot parse the CSV: {e}")),
    }
}

/// Recognises files that are not text: what they look like, if so.
fn binary_kind(bytes: &[u8]) -> Option<String> {
    const MAGIC: &[(&[u8], &str)] = &[
        (b"\x1f\x8b", "gzip-compressed; decompress it first"),
        (
            b"PK\x03\x04",
            "a ZIP archive, e.g. a spreadsheet; export it as CSV",
        ),
        (b"\x89PNG", "a PNG image"),
        (b"\xFF\xD8\xFF", "a JPEG image"),
        (b"\xFF\xFE", "UTF-16 text; save it as UTF-8"),
        (b"\xFE\xFF", "UTF-16 text; save it as UTF-8"),
    ];
    if let Some((_, kind)) = MAGIC.iter().find(|(magic, _)| bytes.starts_with(magic)) {
        return Some((*kind).to_string());
    }
    bytes
        .iter()
        .position(|&b| b == 0)
        .map(|at| format!("it holds a zero byte at offset {at}, so it is binary"))
}

/// Parses a number that fits a finite f32; the error says why not.
fn parse_finite(text: &str) -> std::result::Result<f32, String> {
    let value: f64 = text.parse().map_err(|_| {
        if text.starts_with('"') {
            format!(
                "`{text}` is not a number (a space before an opening quote makes the quote part \
                 of the cell; remove the space)"
            )
        } else {
            format!("`{text}` is not a number")
        }
    })?;
    if !value.is_finite() {
        return Err(format!("`{text}` is not a finite number"));
    }
    let single = value as f32;
    if !single.is_finite() {
        return Err(format!("`{text}` is too large for 32-bit floats"));
    }
    Ok(single)
}

/// Numeric targets are kept as numbers; anything else becomes sorted class names and ids.
fn encode_target(
    file: &str,
    name: &str,
    cells: &[(u64, String)],
) -> Result<(Vec<f32>, Option<Vec<String>>)> {
    if cells.iter().all(|(_, c)| c.parse::<f64>().is_ok()) {
        let values = cells
            .iter()
            .map(|(line, cell)| {
                parse_finite(cell).map_err(|why| {
                    Error::Data(format!(
                        "{file}, line {line}, column `{name}`: {why}; fix or remove the row"
                    ))
                })
            })
            .collect::<Result<Vec<f32>>>()?;
        return Ok((values, None));
    }
    let classes: Vec<String> = cells
        .iter()
        .map(|(_, c)| c.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let ids = map_to_classes(file, name, cells, &classes)?;
    Ok((ids, Some(classes)))
}

/// Maps each target cell to the position of its name in `classes`.
fn map_to_classes(
    file: &str,
    name: &str,
    cells: &[(u64, String)],
    classes: &[String],
) -> Result<Vec<f32>> {
    let index: HashMap<&str, usize> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    cells
        .iter()
        .map(|(line, cell)| {
            index.get(cell.as_str()).map(|&i| i as f32).ok_or_else(|| {
                const SHOWN: usize = 20;
                let mut known: Vec<String> = classes
                    .iter()
                    .take(SHOWN)
                    .map(|c| format!("`{c}`"))
                    .collect();
                if classes.len() > SHOWN {
                    known.push(format!("... ({} in all)", classes.len()));
                }
                Error::Data(format!(
                    "{file}, line {line}, column `{name}`: class `{cell}` is not one of the \
                     model's classes ({}); use only those, or train a new head for new classes",
                    known.join(", ")
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_finite_rejects_non_finite_and_overflow() {
        assert_eq!(parse_finite("1.5e2"), Ok(150.0));
        assert!(parse_finite("nan").is_err());
        assert!(parse_finite("-inf").is_err());
        assert!(parse_finite("1e300").is_err());
        assert!(parse_finite("1,5").is_err());
    }
}
