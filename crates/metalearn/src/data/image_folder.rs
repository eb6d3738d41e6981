//! Image folders: `dir/<class>/<image>.png|jpg|jpeg`, one sub-folder per class.
//!
//! Classes are the sub-folder names, sorted; class id `i` is the `i`-th name. Every image is
//! converted to the requested number of channels (grey or RGB), resized to `height x width`
//! with a triangle (bilinear) filter, which averages over the source pixels when shrinking, and
//! scaled to `[0, 1]`. Inputs are `[n, channels, height, width]`, in path order. Hidden files and
//! folders (names starting with `.`) are skipped; anything else that is not a readable PNG or
//! JPEG image is an error naming its path.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use rayon::prelude::*;

use super::Dataset;
use crate::error::{Error, Result};

/// How images are converted on loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageFolderOptions {
    /// Height in pixels after resizing.
    pub height: usize,
    /// Width in pixels after resizing.
    pub width: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
}

impl Default for ImageFolderOptions {
    /// 28x28 grey images (the Omniglot and MNIST convention).
    fn default() -> Self {
        Self {
            height: 28,
            width: 28,
            channels: 1,
        }
    }
}

/// File extensions read as images (compared case-insensitively).
const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// Image files with their class ids.
pub type LabelledFiles = Vec<(PathBuf, usize)>;

/// The images of a class-folder tree, with the class id of each (in path order), and the
/// class names (the sorted sub-folder names). The folder rules of [`load_image_folder`] apply:
/// errors name the offending path.
pub fn list_image_folder(dir: &Path) -> Result<(LabelledFiles, Vec<String>)> {
    let shown = dir.display();
    if !dir.exists() {
        return Err(Error::Data(format!(
            "{shown}: no such folder; check the path (give a folder holding one sub-folder of \
             images per class)"
        )));
    }
    if !dir.is_dir() {
        return Err(Error::Data(format!(
            "{shown}: not a folder; give a folder holding one sub-folder of images per class"
        )));
    }
    let mut class_dirs = Vec::new();
    let mut loose_images = Vec::new();
    for path in visible_entries(dir)? {
        if path.is_dir() {
            class_dirs.push(path);
        } else if has_image_extension(&path) {
            loose_images.push(path);
        }
    }
    if class_dirs.is_empty() {
        let found = if loose_images.is_empty() {
            String::new()
        } else {
            format!(" (it holds {} image files directly)", loose_images.len())
        };
        return Err(Error::Data(format!(
            "{shown}: no class sub-folders found{found}; put each class's images in its own \
             sub-folder, e.g. {shown}/cat/1.png"
        )));
    }
    if let Some(loose) = loose_images.first() {
        return Err(Error::Data(format!(
            "{}: this image is not inside a class sub-folder; move it into one (or remove it)",
            loose.display()
        )));
    }
    let mut class_names = Vec::with_capacity(class_dirs.len());
    let mut files: Vec<(PathBuf, usize)> = Vec::new();
    for (class_id, class_dir) in class_dirs.iter().enumerate() {
        let before = files.len();
        for path in visible_entries(class_dir)? {
            if path.is_dir() {
                return Err(Error::Data(format!(
                    "{}: unexpected folder inside class folder; a class folder holds only image \
                     files (use one level of class folders)",
                    path.display()
                )));
            }
            if !has_image_extension(&path) {
                return Err(Error::Data(format!(
                    "{}: not a PNG, JPEG or WebP image (expected a .png, .jpg, .jpeg or .webp file); remove \
                     it from the data folder",
                    path.display()
                )));
            }
            files.push((path, class_id));
        }
        if files.len() == before {
            return Err(Error::Data(format!(
                "{}: class folder holds no images; add .png/.jpg/.jpeg/.webp files or remove the \
                 folder",
                class_dir.display()
            )));
        }
        class_names.push(file_name(class_dir));
    }
    Ok((files, class_names))
}

/// Reads every image under `dir/<class>/`, labelled by its class folder.
pub fn load_image_folder(dir: &Path, options: &ImageFolderOptions) -> Result<Dataset> {
    check_options(options)?;
    let (files, class_names) = list_image_folder(dir)?;
    // Decode in parallel, then report the first failure in path order so the message is stable.
    let decoded: Vec<Result<Vec<f32>>> = files
        .par_iter()
        .map(|(path, _)| read_image(path, options))
        .collect();
    let per_image = options.channels * options.height * options.width;
    let mut pixels = Vec::with_capacity(files.len() * per_image);
    for image in decoded {
        pixels.extend(image?);
    }
    let n = files.len();
    let x = Tensor::from_vec(
        pixels,
        (n, options.channels, options.height, options.width),
        &Device::Cpu,
    )?;
    let labels: Vec<f32> = files.iter().map(|&(_, class)| class as f32).collect();
    let y = Tensor::from_vec(labels, n, &Device::Cpu)?;
    Ok(Dataset {
        x,
        y,
        feature_names: Vec::new(),
        target_name: "class".to_string(),
        class_names: Some(class_names),
        source: dir.display().to_string(),
    })
}

fn check_options(options: &ImageFolderOptions) -> Result<()> {
    if options.height == 0 || options.width == 0 {
        return Err(Error::Config(format!(
            "image size {}x{} is invalid; height and width must be at least 1",
            options.height, options.width
        )));
    }
    if !matches!(options.channels, 1 | 3) {
        return Err(Error::Config(format!(
            "{} image channels requested; use 1 (grey) or 3 (RGB)",
            options.channels
        )));
    }
    let too_large = |v: usize| u32::try_from(v).is_err();
    if too_large(options.height) || too_large(options.width) {
        return Err(Error::Config(format!(
            "image size {}x{} is too large",
            options.height, options.width
        )));
    }
    Ok(())
}

/// The entries of a folder whose names do not start with `.`, sorted by path.
fn visible_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let read = |e: std::io::Error| {
        Error::Data(format!(
            "{}: cannot list the folder ({e}); check that it exists and is readable",
            dir.display()
        ))
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let entry = entry.map_err(read)?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            paths.push(entry.path());
        }
    }
    paths.sort();
    Ok(paths)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether a file name ends in an image extension this crate reads.
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Decodes one image to `[channels, height, width]` values in `[0, 1]`.
fn read_image(path: &Path, options: &ImageFolderOptions) -> Result<Vec<f32>> {
    let corrupt = |e: &dyn std::fmt::Display| {
        Error::Data(format!(
            "{}: cannot read the image ({e}); replace or remove the file",
            path.display()
        ))
    };
    // The format is guessed from the content, so a JPEG named .png still loads.
    let image = image::ImageReader::open(path)
        .map_err(|e| corrupt(&e))?
        .with_guessed_format()
        .map_err(|e| corrupt(&e))?
        .decode()
        .map_err(|e| corrupt(&e))?;
    let (width, height) = (options.width as u32, options.height as u32);
    // Converting before resizing keeps full precision for the filter.
    let interleaved: Vec<f32> = if options.channels == 1 {
        let grey = image.to_luma32f();
        if grey.dimensions() == (width, height) {
            grey.into_raw()
        } else {
            image::imageops::resize(&grey, width, height, FilterType::Triangle).into_raw()
        }
    } else {
        let rgb = image.to_rgb32f();
        if rgb.dimensions() == (width, height) {
            rgb.into_raw()
        } else {
            image::imageops::resize(&rgb, width, height, FilterType::Triangle).into_raw()
        }
    };
    // Height x width x channels (interleaved) to channels x height x width (planar).
    let channels = options.channels;
    let plane = options.height * options.width;
    let mut planar = vec![0f32; interleaved.len()];
    for (i, value) in interleaved.into_iter().enumerate() {
        planar[(i % channels) * plane + i / channels] = value.clamp(0.0, 1.0);
    }
    Ok(planar)
}
