//! Image folders: classes from sub-folder names, pixels converted, resized and scaled to [0, 1];
//! every malformed folder is rejected with a message naming the path.

use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, Rgb, RgbImage};
use metalearn::data::image_folder::{load_image_folder, ImageFolderOptions};

fn grey(width: u32, height: u32, value: u8) -> GrayImage {
    GrayImage::from_pixel(width, height, Luma([value]))
}

fn rgb(width: u32, height: u32, value: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(width, height, Rgb(value))
}

fn class_dir(root: &Path, class: &str) -> PathBuf {
    let dir = root.join(class);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn options(height: usize, width: usize, channels: usize) -> ImageFolderOptions {
    ImageFolderOptions {
        height,
        width,
        channels,
    }
}

/// Asserts that loading fails with a message containing every one of `expected`.
fn rejected(dir: &Path, options: &ImageFolderOptions, expected: &[&str]) -> String {
    let result = load_image_folder(dir, options);
    assert!(result.is_err(), "accepted a malformed image folder");
    let message = result.err().unwrap().to_string();
    for part in expected {
        assert!(message.contains(part), "message lacks `{part}`: {message}");
    }
    message
}

#[test]
fn default_options_are_28x28_grey() {
    assert_eq!(ImageFolderOptions::default(), options(28, 28, 1));
}

#[test]
fn classes_are_sorted_folder_names_and_files_sorted_paths() {
    let root = tempfile::tempdir().unwrap();
    let zebra = class_dir(root.path(), "zebra");
    let ant = class_dir(root.path(), "ant");
    grey(4, 4, 255).save(zebra.join("b.png")).unwrap();
    grey(4, 4, 0).save(zebra.join("a.png")).unwrap();
    grey(4, 4, 51).save(ant.join("only.png")).unwrap();
    let ds = load_image_folder(root.path(), &options(4, 4, 1)).unwrap();
    assert_eq!(
        ds.class_names,
        Some(vec!["ant".to_string(), "zebra".to_string()])
    );
    assert_eq!(ds.target_name, "class");
    assert!(ds.feature_names.is_empty());
    assert_eq!(ds.source, root.path().display().to_string());
    assert_eq!(ds.x.dims(), &[3, 1, 4, 4]);
    assert_eq!(ds.input_shape(), vec![1, 4, 4]);
    assert_eq!(ds.class_ids().unwrap(), vec![0, 1, 1]);
    // Order: ant/only.png, zebra/a.png, zebra/b.png.
    let means: Vec<f32> =
        ds.x.flatten_from(1)
            .unwrap()
            .mean(1)
            .unwrap()
            .to_vec1()
            .unwrap();
    let expected = [0.2f32, 0.0, 1.0];
    for (m, e) in means.iter().zip(expected) {
        assert!((m - e).abs() < 1e-6, "{means:?}");
    }
}

#[test]
fn rgb_is_laid_out_channels_first_and_grey_converts_both_ways() {
    let root = tempfile::tempdir().unwrap();
    let dir = class_dir(root.path(), "c");
    rgb(2, 3, [255, 0, 51]).save(dir.join("a.png")).unwrap();
    grey(2, 3, 102).save(dir.join("b.png")).unwrap();

    let colour = load_image_folder(root.path(), &options(3, 2, 3)).unwrap();
    assert_eq!(colour.x.dims(), &[2, 3, 3, 2]);
    let first = colour.x.get(0).unwrap();
    let planes: Vec<Vec<f32>> = first.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
    for (plane, value) in planes.iter().zip([1.0f32, 0.0, 0.2]) {
        assert!(plane.iter().all(|v| (v - value).abs() < 1e-6), "{planes:?}");
    }
    // A grey image becomes three equal planes.
    let second: Vec<f32> = colour
        .x
        .get(1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(second.iter().all(|v| (v - 0.4).abs() < 1e-6), "{second:?}");

    // RGB to grey uses luminance weights: pure red is darker than white but not black.
    let mono = load_image_folder(root.path(), &options(3, 2, 1)).unwrap();
    assert_eq!(mono.x.dims(), &[2, 1, 3, 2]);
    let red: Vec<f32> = mono
        .x
        .get(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(red.iter().all(|&v| v > 0.1 && v < 0.6), "{red:?}");
}

#[test]
fn images_are_resized_and_stay_in_unit_range() {
    let root = tempfile::tempdir().unwrap();
    let dir = class_dir(root.path(), "stripes");
    // Left half black, right half white: after shrinking, the left stays dark, the right light.
    let image = GrayImage::from_fn(20, 10, |x, _| Luma([if x < 10 { 0 } else { 255 }]));
    image.save(dir.join("s.png")).unwrap();
    let ds = load_image_folder(root.path(), &options(5, 4, 1)).unwrap();
    assert_eq!(ds.x.dims(), &[1, 1, 5, 4]);
    let rows: Vec<Vec<f32>> = ds.x.reshape((5, 4)).unwrap().to_vec2().unwrap();
    for row in &rows {
        assert!(row.iter().all(|v| (0.0..=1.0).contains(v)), "{rows:?}");
        assert!(row[0] < 0.1 && row[3] > 0.9, "{rows:?}");
    }
}

#[test]
fn jpeg_files_and_upper_case_extensions_load() {
    let root = tempfile::tempdir().unwrap();
    let dir = class_dir(root.path(), "photos");
    rgb(8, 8, [200, 200, 200]).save(dir.join("a.jpg")).unwrap();
    rgb(8, 8, [10, 10, 10]).save(dir.join("b.jpeg")).unwrap();
    // Saved as PNG, then renamed: extension upper case, format guessed from the content.
    rgb(8, 8, [128, 128, 128]).save(dir.join("c.png")).unwrap();
    std::fs::rename(dir.join("c.png"), dir.join("c.PNG")).unwrap();
    let ds = load_image_folder(root.path(), &options(4, 4, 3)).unwrap();
    assert_eq!(ds.len(), 3);
    let means: Vec<f32> =
        ds.x.flatten_from(1)
            .unwrap()
            .mean(1)
            .unwrap()
            .to_vec1()
            .unwrap();
    // JPEG is lossy: compare loosely.
    assert!((means[0] - 200.0 / 255.0).abs() < 0.03, "{means:?}");
    assert!((means[1] - 10.0 / 255.0).abs() < 0.03, "{means:?}");
    assert!((means[2] - 128.0 / 255.0).abs() < 1e-6, "{means:?}");
}

#[test]
fn hidden_files_and_folders_are_skipped() {
    let root = tempfile::tempdir().unwrap();
    let dir = class_dir(root.path(), "a");
    grey(2, 2, 0).save(dir.join("x.png")).unwrap();
    std::fs::write(dir.join(".DS_Store"), b"junk").unwrap();
    class_dir(root.path(), ".git");
    std::fs::write(root.path().join(".hidden.png"), b"junk").unwrap();
    // A top-level text file (a README) is not an image and is not a class.
    std::fs::write(root.path().join("README.txt"), b"about this data").unwrap();
    let ds = load_image_folder(root.path(), &options(2, 2, 1)).unwrap();
    assert_eq!(ds.len(), 1);
    assert_eq!(ds.class_names, Some(vec!["a".to_string()]));
}

#[test]
fn loading_is_deterministic() {
    let root = tempfile::tempdir().unwrap();
    for (class, n) in [("b", 3u8), ("a", 4)] {
        let dir = class_dir(root.path(), class);
        for i in 0..n {
            grey(3, 3, i * 40)
                .save(dir.join(format!("{i}.png")))
                .unwrap();
        }
    }
    let first = load_image_folder(root.path(), &options(3, 3, 1)).unwrap();
    let second = load_image_folder(root.path(), &options(3, 3, 1)).unwrap();
    let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(flat(&first.x), flat(&second.x));
    assert_eq!(first.class_ids().unwrap(), vec![0, 0, 0, 0, 1, 1, 1]);
}

#[test]
fn missing_folder_is_rejected() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("nowhere");
    rejected(
        &missing,
        &ImageFolderOptions::default(),
        &["nowhere", "no such folder"],
    );
}

#[test]
fn a_file_instead_of_a_folder_is_rejected() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("data.csv");
    std::fs::write(&file, b"a,b\n1,2\n").unwrap();
    rejected(
        &file,
        &ImageFolderOptions::default(),
        &["data.csv", "not a folder"],
    );
}

#[test]
fn folder_without_class_sub_folders_is_rejected() {
    let root = tempfile::tempdir().unwrap();
    let shown = root.path().display().to_string();
    rejected(
        root.path(),
        &ImageFolderOptions::default(),
        &[&shown, "no class sub-folders"],
    );
    grey(2, 2, 0).save(root.path().join("loose.png")).unwrap();
    rejected(
        root.path(),
        &ImageFolderOptions::default(),
        &[&shown, "no class sub-folders", "1 image files directly"],
    );
}

#[test]
fn image_outside_class_folders_is_rejected() {
    let root = tempfile::tempdir().unwrap();
    let dir = class_dir(root.path(), "a");
    grey(2, 2, 0).save(dir.join("x.png")).unwrap();
    grey(2, 2, 0).save(root.path().join("stray.png")).unwrap();
    rejected(
        root.path(),
        &ImageFolderOptions::default(),
        &["stray.png", "class sub-folder"],
    );
}

#[test]
fn empty_class_folder_is_rejected() {
    let root = tempfile::tempdir().unwrap();
    let dir = class_dir(root.path(), "full");
    grey(2, 2, 0).save(dir.join("x.png")).unwrap();
    let empty = class_dir(root.path(), "empty");
    // Hidden files do not count as images.
    std::fs::write(empty.join(".keep"), b"").unwrap();
    rejected(
        root.path(),
        &ImageFolderOptions::default(),
        &["empty", "no images"],
    );
}

#[test]
fn non_image_file_is_rejected() {
    let root = tempfile::tempdir().unwrap();
    let dir = class_dir(root.path(), "a");
    grey(2, 2, 0).save(dir.join("x.png")).unwrap();
    std::fs::write(dir.join("notes.txt"), b"hello").unwrap();
    rejected(
        root.path(),
        &ImageFolderOptions::default(),
        &["notes.txt", "not a PNG, JPEG or WebP"],
    );
}

#[test]
fn corrupt_and_truncated_images_are_rejected() {
    let root = tempfile::tempdir().unwrap();
    let dir = class_dir(root.path(), "a");
    grey(2, 2, 0).save(dir.join("good.png")).unwrap();
    std::fs::write(dir.join("bad.png"), b"this is not a png at all").unwrap();
    rejected(
        root.path(),
        &ImageFolderOptions::default(),
        &["bad.png", "cannot read the image"],
    );

    std::fs::remove_file(dir.join("bad.png")).unwrap();
    let png = std::fs::read(dir.join("good.png")).unwrap();
    std::fs::write(dir.join("cut.png"), &png[..png.len() / 2]).unwrap();
    rejected(
        root.path(),
        &ImageFolderOptions::default(),
        &["cut.png", "cannot read the image"],
    );

    std::fs::remove_file(dir.join("cut.png")).unwrap();
    std::fs::write(dir.join("empty.jpg"), b"").unwrap();
    rejected(root.path(), &ImageFolderOptions::default(), &["empty.jpg"]);
}

#[test]
fn nested_folder_inside_class_is_rejected() {
    let root = tempfile::tempdir().unwrap();
    let dir = class_dir(root.path(), "a");
    grey(2, 2, 0).save(dir.join("x.png")).unwrap();
    class_dir(&dir, "deeper");
    rejected(
        root.path(),
        &ImageFolderOptions::default(),
        &["deeper", "inside class folder"],
    );
}

#[test]
fn invalid_options_are_rejected() {
    let root = tempfile::tempdir().unwrap();
    let dir = class_dir(root.path(), "a");
    grey(2, 2, 0).save(dir.join("x.png")).unwrap();
    rejected(
        root.path(),
        &options(28, 28, 2),
        &["2 image channels", "1 (grey) or 3 (RGB)"],
    );
    rejected(root.path(), &options(0, 28, 1), &["0x28"]);
    rejected(root.path(), &options(28, 0, 1), &["28x0"]);
}
