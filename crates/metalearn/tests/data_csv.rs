//! CSV loading: accepted variants produce the right tensors; every malformed file is rejected
//! with a message naming the file, the line as counted in the file and the column.

use std::path::{Path, PathBuf};

use metalearn::data::csv::{load_csv, load_csv_features, load_csv_with_classes};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn rows(t: &candle_core::Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn targets(t: &candle_core::Tensor) -> Vec<f32> {
    t.to_vec1::<f32>().unwrap()
}

/// Loads `bytes` as a CSV with target `label` and returns the error message, which must name the
/// file and contain every one of `expected`.
fn rejected(bytes: &[u8], target: &str, expected: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "data.csv", bytes);
    let result = load_csv(&path, target);
    assert!(
        result.is_err(),
        "accepted malformed CSV {:?}",
        String::from_utf8_lossy(bytes)
    );
    let message = result.err().unwrap().to_string();
    assert!(
        message.contains("data.csv"),
        "message lacks the file: {message}"
    );
    for part in expected {
        assert!(message.contains(part), "message lacks `{part}`: {message}");
    }
    message
}

#[test]
fn numeric_target_is_kept_as_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "reg.csv", b"a,b,y\n1,2,0.5\n3,4,-1.25\n");
    let ds = load_csv(&path, "y").unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.input_shape(), vec![2]);
    assert_eq!(rows(&ds.x), vec![vec![1., 2.], vec![3., 4.]]);
    assert_eq!(targets(&ds.y), vec![0.5, -1.25]);
    assert_eq!(ds.feature_names, vec!["a", "b"]);
    assert_eq!(ds.target_name, "y");
    assert_eq!(ds.class_names, None);
    assert_eq!(ds.num_classes(), None);
    assert_eq!(ds.source, path.display().to_string());
}

#[test]
fn target_may_be_any_column_and_features_keep_file_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "mid.csv", b"a,label,b,c\n1,0,2,3\n4,1,5,6\n");
    let ds = load_csv(&path, "label").unwrap();
    assert_eq!(ds.feature_names, vec!["a", "b", "c"]);
    assert_eq!(rows(&ds.x), vec![vec![1., 2., 3.], vec![4., 5., 6.]]);
    assert_eq!(ds.class_ids().unwrap(), vec![0, 1]);
}

#[test]
fn categorical_target_gets_sorted_class_ids() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "iris.csv",
        b"x,species\n1,virginica\n2,setosa\n3,versicolor\n4,setosa\n",
    );
    let ds = load_csv(&path, "species").unwrap();
    assert_eq!(
        ds.class_names,
        Some(vec![
            "setosa".to_string(),
            "versicolor".to_string(),
            "virginica".to_string()
        ])
    );
    assert_eq!(ds.num_classes(), Some(3));
    assert_eq!(ds.class_ids().unwrap(), vec![2, 0, 1, 0]);
}

#[test]
fn one_non_numeric_target_cell_makes_the_target_categorical() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "mixed.csv", b"x,t\n1,2\n2,10\n3,other\n");
    let ds = load_csv(&path, "t").unwrap();
    // Sorted as text: "10" < "2" < "other".
    assert_eq!(
        ds.class_names,
        Some(vec!["10".to_string(), "2".to_string(), "other".to_string()])
    );
    assert_eq!(ds.class_ids().unwrap(), vec![1, 0, 2]);
}

#[test]
fn bom_quotes_crlf_and_whitespace_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let text = "\u{FEFF}\"feat one\", feat2 ,\"label\"\r\n 1.5 ,\" 2 \", cat \r\n\"3\",  -4e-1 ,\"dog\"\r\n";
    let path = write(dir.path(), "excel.csv", text.as_bytes());
    let ds = load_csv(&path, "label").unwrap();
    assert_eq!(ds.feature_names, vec!["feat one", "feat2"]);
    assert_eq!(rows(&ds.x), vec![vec![1.5, 2.], vec![3., -0.4]]);
    assert_eq!(
        ds.class_names,
        Some(vec!["cat".to_string(), "dog".to_string()])
    );
    assert_eq!(targets(&ds.y), vec![0., 1.]);
}

#[test]
fn blank_lines_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "blank.csv", b"a,y\n\n1,0\n   \n2,1\n\n");
    let ds = load_csv(&path, "y").unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(targets(&ds.y), vec![0., 1.]);
}

#[test]
fn target_name_is_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "t.csv", b"a,y\n1,0\n");
    assert_eq!(load_csv(&path, " y ").unwrap().target_name, "y");
}

#[test]
fn features_are_read_by_name_without_the_target() {
    let dir = tempfile::tempdir().unwrap();
    // Extra text column `id` and the missing target are both fine for prediction.
    let path = write(dir.path(), "query.csv", b"id,b,a\nq1,2,1\nq2,4,3\n");
    let names = vec!["a".to_string(), "b".to_string()];
    let x = load_csv_features(&path, &names).unwrap();
    assert_eq!(rows(&x), vec![vec![1., 2.], vec![3., 4.]]);

    let missing = load_csv_features(&path, &["a".to_string(), "c".to_string()]);
    let message = missing.err().unwrap().to_string();
    assert!(
        message.contains("query.csv") && message.contains("`c`"),
        "{message}"
    );
    assert!(load_csv_features(&path, &[]).is_err());
}

#[test]
fn feature_loading_still_rejects_bad_cells_in_used_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "q.csv", b"a,b\n1,2\nx,4\n");
    let message = load_csv_features(&path, &["a".to_string()])
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains("line 3") && message.contains("column `a`"),
        "{message}"
    );
    // Column `b` is not used, so its bad cell does not matter.
    let path = write(dir.path(), "q2.csv", b"a,b\n1,2\n3,oops\n");
    assert_eq!(
        rows(&load_csv_features(&path, &["a".to_string()]).unwrap()),
        vec![vec![1.], vec![3.]]
    );
}

#[test]
fn test_file_uses_the_training_class_ids() {
    let dir = tempfile::tempdir().unwrap();
    let train = write(dir.path(), "train.csv", b"x,c\n1,a\n2,b\n3,c\n");
    let test = write(dir.path(), "test.csv", b"x,c\n1,c\n2,c\n");
    let train_ds = load_csv(&train, "c").unwrap();
    // On its own the test file would have one class `c` with id 0.
    assert_eq!(
        load_csv(&test, "c").unwrap().class_ids().unwrap(),
        vec![0, 0]
    );
    let names = train_ds.class_names.clone().unwrap();
    let test_ds = load_csv_with_classes(&test, "c", Some(&names)).unwrap();
    assert_eq!(test_ds.class_ids().unwrap(), vec![2, 2]);
    assert_eq!(test_ds.class_names, Some(names.clone()));

    let unknown = write(dir.path(), "unknown.csv", b"x,c\n1,a\n2,zebra\n");
    let message = load_csv_with_classes(&unknown, "c", Some(&names))
        .err()
        .unwrap()
        .to_string();
    for part in ["unknown.csv", "line 3", "column `c`", "zebra", "`a`"] {
        assert!(message.contains(part), "lacks `{part}`: {message}");
    }
}

#[test]
fn quoted_multi_line_field_keeps_line_numbers_right() {
    // The quoted class on line 2 spans lines 2-3, so the bad cell is on line 6.
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "multi.csv",
        b"x,y\n1,\"two\nlines\"\n2,b\n\"3\",a\nbad,a\n",
    );
    let message = load_csv(&path, "y").err().unwrap().to_string();
    assert!(
        message.contains("line 6") && message.contains("column `x`"),
        "{message}"
    );
    let path = write(dir.path(), "multi_ok.csv", b"x,y\n1,\"two\nlines\"\n2,b\n");
    let ds = load_csv(&path, "y").unwrap();
    assert_eq!(
        ds.class_names,
        Some(vec!["b".to_string(), "two\nlines".to_string()])
    );
    assert_eq!(ds.class_ids().unwrap(), vec![1, 0]);
}

#[test]
fn missing_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.csv");
    let message = load_csv(&path, "y").err().unwrap().to_string();
    assert!(
        message.contains("nope.csv") && message.contains("check the path"),
        "{message}"
    );
    assert!(load_csv_features(&path, &["a".to_string()]).is_err());
}

#[test]
fn a_folder_is_not_a_csv_file() {
    let dir = tempfile::tempdir().unwrap();
    let message = load_csv(dir.path(), "y").err().unwrap().to_string();
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
}

#[test]
fn empty_and_whitespace_only_files_are_rejected() {
    rejected(b"", "y", &["empty"]);
    rejected(b"\n\r\n  \n", "y", &["empty"]);
    rejected(b"\xEF\xBB\xBF", "y", &["empty"]);
}

#[test]
fn header_without_rows_is_rejected() {
    rejected(b"a,b,y\n", "y", &["no data rows"]);
    rejected(b"a,b,y", "y", &["no data rows"]);
    rejected(b"a,b,y\n\n\n", "y", &["no data rows"]);
}

#[test]
fn missing_target_lists_columns_and_suggests_closest() {
    let message = rejected(
        b"sepal,petal,species\n1,2,a\n",
        "specis",
        &["`specis`", "`sepal`", "`petal`", "did you mean `species`"],
    );
    assert!(message.contains("not found"), "{message}");
    let message = rejected(b"a,b\n1,2\n", "zzz", &["`zzz`", "`a`, `b`"]);
    assert!(!message.contains("did you mean"), "{message}");
}

#[test]
fn duplicate_column_names_are_rejected() {
    rejected(
        b"a,b,a,y\n1,2,3,0\n",
        "y",
        &["line 1", "`a`", "twice", "columns 1 and 3"],
    );
    // Names are compared after trimming.
    rejected(b"a, a,y\n1,2,0\n", "y", &["line 1", "`a`", "twice"]);
}

#[test]
fn unnamed_header_column_is_rejected() {
    rejected(b"a,,y\n1,2,0\n", "y", &["line 1", "column 2", "no name"]);
}

#[test]
fn wrong_field_counts_are_rejected() {
    rejected(
        b"a,b,y\n1,2,0\n3,4\n",
        "y",
        &["line 3", "too few", "has 2", "3 columns"],
    );
    rejected(b"a,b,y\n1,2,0,9\n", "y", &["line 2", "too many", "has 4"]);
    // A trailing comma is an extra, empty field.
    rejected(b"a,b,y\n1,2,0,\n", "y", &["line 2", "too many"]);
}

#[test]
fn empty_cells_are_rejected() {
    rejected(b"a,b,y\n1,,0\n", "y", &["line 2", "column `b`", "empty"]);
    rejected(
        b"a,b,y\n1,2,0\n1,2,   \n",
        "y",
        &["line 3", "column `y`", "empty"],
    );
    rejected(
        b"a,b,y\n1,\"\",0\n",
        "y",
        &["line 2", "column `b`", "empty"],
    );
}

#[test]
fn non_numeric_feature_cells_are_rejected() {
    rejected(
        b"a,b,y\n1,2,0\n1,two,1\n",
        "y",
        &["line 3", "column `b`", "`two`", "not a number"],
    );
    rejected(b"a,y\n5%,0\n", "y", &["line 2", "column `a`", "`5%`"]);
    rejected(b"a,y\n\"1,5\",0\n", "y", &["line 2", "column `a`", "`1,5`"]);
    // A space before an opening quote makes the quote part of the cell (RFC 4180).
    rejected(b"a,y\n \"1\",0\n", "y", &["line 2", "column `a`", "quote"]);
}

#[test]
fn non_finite_values_are_rejected() {
    for cell in ["NaN", "nan", "inf", "-inf", "Infinity", "1e39"] {
        let csv = format!("a,y\n1,0\n{cell},1\n");
        rejected(csv.as_bytes(), "y", &["line 3", "column `a`", cell]);
        let csv = format!("a,y\n1,0\n2,{cell}\n");
        rejected(csv.as_bytes(), "y", &["line 3", "column `y`", cell]);
    }
}

#[test]
fn invalid_utf8_is_rejected() {
    // Latin-1 "é" in a feature cell and in a header name.
    rejected(b"a,y\n1\xE9,0\n", "y", &["line 2", "column `a`", "UTF-8"]);
    rejected(b"caf\xE9,y\n1,0\n", "y", &["line 1", "column 1", "UTF-8"]);
    rejected(
        b"a,y\n1,0\n2,caf\xE9\n",
        "y",
        &["line 3", "column `y`", "UTF-8"],
    );
}

#[test]
fn binary_files_are_rejected() {
    rejected(b"a,y\n1,0\x00\x01\x02\n", "y", &["binary"]);
    rejected(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "y", &["PNG"]);
    rejected(b"\x1f\x8b\x08\x00\x00\x00", "y", &["gzip"]);
    rejected(b"PK\x03\x04\x14\x00", "y", &["ZIP"]);
    rejected(b"\xFF\xFEa\x00,\x00y\x00", "y", &["UTF-16"]);
}

#[test]
fn target_as_only_column_is_rejected() {
    rejected(b"y\n1\n2\n", "y", &["feature"]);
}

#[test]
fn errors_name_lines_after_skipped_blank_lines() {
    rejected(b"a,y\n\n\n1,0\nx,1\n", "y", &["line 5", "column `a`"]);
}
