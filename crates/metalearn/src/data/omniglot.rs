//! Omniglot: 1,623 handwritten characters from 50 alphabets, 20 drawings each.
//!
//! Reads the official archives (`images_background.zip`, `images_evaluation.zip`,
//! `images_background_small1.zip`, ...) directly, or the same layout unpacked in a folder:
//! `<root>/<Alphabet>/<characterNN>/<image>.png`. Every character is a class named
//! `Alphabet/characterNN` and its alphabet is its group, so episodes can be drawn within one
//! alphabet and splits can keep whole alphabets apart.
//!
//! Images (105x105, black strokes on white) are turned into ink maps (ink = 1, background = 0)
//! and resized to `height x width` (28x28 by default) with an area filter (each output pixel is
//! the ink coverage of its footprint) or Lanczos3 (clamped to `[0, 1]`). Optional rotations by
//! 90, 180 and 270 degrees add three classes per character (`Alphabet/characterNN/rot90`, ...)
//! in the same alphabet; optional reflections add each character's mirror image
//! (`.../mirror`, and with rotations `.../mirror-rot90`, ...) as more classes.
//!
//! Decoding thousands of PNGs takes seconds, so the decoded images are cached in one binary file
//! keyed by the archive's SHA-256 (for a folder: by its file names, sizes and modification
//! times) and the image size and filter. A cache file that is truncated, of another version or
//! whose checksum does not match is rebuilt.
//!
//! ```no_run
//! use metalearn::data::classes::SplitSpec;
//! use metalearn::data::omniglot::{OmniglotData, OmniglotOptions, OmniglotSplit};
//!
//! # fn main() -> metalearn::Result<()> {
//! let data = OmniglotData::load("images_background.zip".as_ref(), &OmniglotOptions::default())?;
//! let split = OmniglotSplit::Fractions(SplitSpec { by_group: true, ..SplitSpec::default() });
//! // Class ids of meta-training, validation and test, with every class's images in the pool.
//! let [train, validation, test] = data.split(&split)?;
//! let pool = data.class_pool()?;
//! assert_eq!(pool.num_classes(), data.num_classes());
//! # Ok(()) }
//! ```

use std::collections::BTreeSet;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::augment::{Supersampled, Variant};
use crate::data::classes::{split_classes, ClassPool, SplitSpec};
use crate::error::{Error, Result};
use crate::fsutil::atomic_write;

/// How a 105x105 drawing is shrunk to the model's input size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resample {
    /// Box filter: each output pixel is the mean ink over its footprint (no ringing).
    #[default]
    Area,
    /// Lanczos with a 3-lobe window, clamped to `[0, 1]` (what PIL's `ANTIALIAS` did).
    Lanczos3,
}

impl Resample {
    /// The name used in configs and cache keys.
    pub fn name(self) -> &'static str {
        match self {
            Resample::Area => "area",
            Resample::Lanczos3 => "lanczos3",
        }
    }
}

impl std::str::FromStr for Resample {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "area" | "box" => Ok(Resample::Area),
            "lanczos3" | "lanczos" => Ok(Resample::Lanczos3),
            other => Err(Error::Config(format!(
                "resampling filter `{other}` is unknown: use \"area\" or \"lanczos3\""
            ))),
        }
    }
}

/// Where decoded images are cached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CachePolicy {
    /// `<archive folder>/.metalearn-cache/`, or the user cache folder
    /// (`$XDG_CACHE_HOME/metalearn` or `~/.cache/metalearn`) when that folder is read-only.
    #[default]
    Default,
    /// This folder (an error if it cannot be written).
    Dir(PathBuf),
    /// Never read or write a cache.
    Off,
}

/// How Omniglot images are loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct OmniglotOptions {
    /// Height after resizing (default 28).
    pub height: usize,
    /// Width after resizing (default 28).
    pub width: usize,
    /// The resizing filter (default area).
    pub resample: Resample,
    /// Add each character rotated by 90, 180 and 270 degrees as three more classes.
    pub rotations: bool,
    /// Add each character's left-right mirror image as one more class (with `rotations`, the
    /// mirror image's rotations too: four more classes).
    pub reflections: bool,
    /// Where decoded images are cached.
    pub cache: CachePolicy,
}

impl Default for OmniglotOptions {
    fn default() -> Self {
        Self {
            height: 28,
            width: 28,
            resample: Resample::Area,
            rotations: false,
            reflections: false,
            cache: CachePolicy::Default,
        }
    }
}

/// What happened with the cache during a load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Images were read from this cache file.
    Hit(PathBuf),
    /// Images were decoded and written to this cache file.
    Written(PathBuf),
    /// The cache file was unusable (the reason), so images were decoded and it was rewritten.
    Rebuilt {
        /// The cache file.
        path: PathBuf,
        /// Why the old file was rejected.
        reason: String,
    },
    /// Images were decoded but no cache folder could be written (the reason).
    NotWritten(String),
    /// Caching was turned off.
    Off,
}

impl CacheOutcome {
    /// Whether the images came from the cache.
    pub fn is_hit(&self) -> bool {
        matches!(self, CacheOutcome::Hit(_))
    }
}

/// Omniglot images with their classes (characters) and groups (alphabets).
#[derive(Clone, Debug)]
pub struct OmniglotData {
    /// Ink maps `[n, 1, height, width]`, f32 in `[0, 1]`, ink = 1.
    pub images: Tensor,
    /// Class id of each image.
    pub labels: Vec<usize>,
    /// `Alphabet/characterNN`, with `/rot90`, `/rot180`, `/rot270` for rotated copies and
    /// `/mirror`, `/mirror-rot90`, ... for mirrored ones.
    pub class_names: Vec<String>,
    /// Alphabet id of each class (an index into `alphabets`).
    pub groups: Vec<usize>,
    /// Alphabet names, sorted.
    pub alphabets: Vec<String>,
    /// For each class, the id of the character it was made from (itself if neither rotated nor
    /// mirrored), so that splits by character keep the copies with their character.
    pub base_class: Vec<usize>,
}

/// How classes are divided into meta-training, validation and test.
#[derive(Clone, Debug, PartialEq)]
pub enum OmniglotSplit {
    /// Random fractions of alphabets (`by_group = true`) or of characters.
    Fractions(SplitSpec),
    /// Named alphabets for each split; unlisted alphabets are left out.
    Alphabets(AlphabetSplit),
}

/// Alphabets of meta-training, validation and test, by name (the config's
/// `split_alphabets = { train = [...], validation = [...], test = [...] }`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlphabetSplit {
    /// Meta-training alphabets.
    #[serde(default)]
    pub train: Vec<String>,
    /// Validation alphabets.
    #[serde(default)]
    pub validation: Vec<String>,
    /// Test alphabets.
    #[serde(default)]
    pub test: Vec<String>,
}

/// The copies `options` asks for beyond the images themselves, each with its class-name
/// suffix, in class-id order after the original characters.
fn extra_classes(options: &OmniglotOptions) -> Vec<(String, Variant)> {
    let turns: &[u8] = if options.rotations {
        &[0, 1, 2, 3]
    } else {
        &[0]
    };
    let mirrors: &[bool] = if options.reflections {
        &[false, true]
    } else {
        &[false]
    };
    let mut variants = Vec::new();
    for &mirrored in mirrors {
        for &quarter_turns in turns {
            let variant = Variant {
                mirrored,
                quarter_turns,
            };
            let rotation = format!("rot{}", 90 * u32::from(quarter_turns));
            let suffix = match (mirrored, quarter_turns) {
                (false, 0) => continue,
                (false, _) => rotation,
                (true, 0) => "mirror".to_string(),
                (true, _) => format!("mirror-{rotation}"),
            };
            variants.push((suffix, variant));
        }
    }
    variants
}

impl OmniglotData {
    /// Loads an Omniglot zip archive or unpacked folder (see the module documentation).
    pub fn load(path: &Path, options: &OmniglotOptions) -> Result<Self> {
        Self::load_with_cache_outcome(path, options).map(|(data, _)| data)
    }

    /// Like [`OmniglotData::load`], also saying whether the images came from the cache.
    pub fn load_with_cache_outcome(
        path: &Path,
        options: &OmniglotOptions,
    ) -> Result<(Self, CacheOutcome)> {
        if options.height == 0 || options.width == 0 {
            return Err(Error::Config(format!(
                "Omniglot image size must be at least 1x1, got {}x{}",
                options.height, options.width
            )));
        }
        if options.rotations && options.height != options.width {
            return Err(Error::Config(format!(
                "rotations need square images, got {}x{}; set equal height and width",
                options.height, options.width
            )));
        }
        let archive = Archive::open(path)?;
        let key = CacheKey {
            source: archive.fingerprint.clone(),
            height: options.height,
            width: options.width,
            resample: options.resample,
        };
        let (base, outcome) = match cache_dirs(path, &options.cache) {
            None => (archive.decode(options)?, CacheOutcome::Off),
            Some(dirs) => load_through_cache(&archive, options, &key, &dirs, &options.cache)?,
        };
        let data = base.into_data(options)?;
        Ok((data, outcome))
    }

    /// The images of `path` (the archive or folder this data was loaded from, with the same
    /// `options`) at `factor` times the resolution, for augmentation that warps fine detail
    /// before shrinking (see [`Supersampled`]). Decoded afresh; not cached.
    pub fn supersampled(
        &self,
        path: &Path,
        options: &OmniglotOptions,
        factor: usize,
    ) -> Result<Supersampled> {
        let archive = Archive::open(path)?;
        let (h, w) = (options.height * factor, options.width * factor);
        let decoded: Vec<Vec<f32>> = archive
            .entries
            .par_iter()
            .map(|e| preprocess_png(&e.bytes, h, w, options.resample, &e.name))
            .collect::<Result<_>>()?;
        let drawings = decoded.len();
        // Images are stored as loaded first, then one block per variant (see `into_data`).
        let variants = extra_classes(options);
        if drawings == 0 || self.labels.len() != drawings * (1 + variants.len()) {
            return Err(Error::Data(format!(
                "{}: {drawings} drawings in {} variants do not match the {} loaded images; was \
                 it changed while loading, or loaded with other options?",
                archive.display,
                1 + variants.len(),
                self.labels.len()
            )));
        }
        let pixels: Vec<u8> = decoded
            .iter()
            .flatten()
            .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        let mut examples: Vec<(u32, Variant)> = (0..drawings as u32)
            .map(|d| (d, Variant::IDENTITY))
            .collect();
        for (_, variant) in variants {
            examples.extend((0..drawings as u32).map(|d| (d, variant)));
        }
        Supersampled::new(factor, [options.height, options.width], pixels, examples)
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of classes (characters, and their rotated copies).
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// The pool of examples for episodic sampling, grouped by alphabet.
    pub fn class_pool(&self) -> Result<ClassPool> {
        ClassPool::new(
            self.images.clone(),
            &self.labels,
            self.class_names.clone(),
            Some(self.groups.clone()),
        )
    }

    /// Class ids of meta-training, validation and test. A split by character keeps each
    /// character's rotated copies with the character; rotated copies are used for
    /// meta-training only (validation and test hold the characters as drawn).
    pub fn split(&self, split: &OmniglotSplit) -> Result<[Vec<usize>; 3]> {
        let mut splits = self.split_all(split)?;
        // Rotated copies augment meta-training only: validation and test use the characters
        // as drawn, as in the field's protocol.
        for held_out in &mut splits[1..] {
            held_out.retain(|&c| self.base_class[c] == c);
        }
        Ok(splits)
    }

    fn split_all(&self, split: &OmniglotSplit) -> Result<[Vec<usize>; 3]> {
        match split {
            OmniglotSplit::Fractions(spec) if spec.by_group => {
                split_classes(&self.grouping_pool(self.groups.clone())?, spec)
            }
            OmniglotSplit::Fractions(spec) => {
                let by_character = SplitSpec {
                    by_group: true,
                    ..spec.clone()
                };
                split_classes(&self.grouping_pool(self.base_class.clone())?, &by_character)
            }
            OmniglotSplit::Alphabets(AlphabetSplit {
                train,
                validation,
                test,
            }) => {
                let mut out: [Vec<usize>; 3] = Default::default();
                let mut seen = BTreeSet::new();
                for (slot, names) in [train, validation, test].into_iter().enumerate() {
                    for name in names {
                        let id =
                            self.alphabets
                                .iter()
                                .position(|a| a == name)
                                .ok_or_else(|| {
                                    Error::Config(format!(
                                        "alphabet `{name}` is not in the data; it has: {}",
                                        self.alphabets.join(", ")
                                    ))
                                })?;
                        if !seen.insert(id) {
                            return Err(Error::Config(format!(
                                "alphabet `{name}` is listed in two splits (or twice)"
                            )));
                        }
                        out[slot].extend((0..self.num_classes()).filter(|&c| self.groups[c] == id));
                    }
                    out[slot].sort_unstable();
                }
                Ok(out)
            }
        }
    }

    /// A pool without examples whose groups are `groups`, to reuse the generic splitter.
    fn grouping_pool(&self, groups: Vec<usize>) -> Result<ClassPool> {
        let empty = Tensor::zeros((0, 1), candle_core::DType::F32, &Device::Cpu)?;
        ClassPool::new(empty, &[], self.class_names.clone(), Some(groups))
    }
}

/// Whether `path` looks like Omniglot: a `.zip` file, or a folder of alphabet folders of
/// character folders of images (`<root>/<Alphabet>/<characterNN>/<image>.png`).
pub fn is_omniglot_path(path: &Path) -> bool {
    if path.is_file() {
        return path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("zip"));
    }
    if !path.is_dir() {
        return false;
    }
    let Ok(alphabets) = visible_children(path) else {
        return false;
    };
    let Some(first) = alphabets.iter().find(|p| p.is_dir()) else {
        return false;
    };
    let Ok(characters) = visible_children(first) else {
        return false;
    };
    let no_loose_images = characters.iter().all(|p| p.is_dir() || !is_png_name(p));
    no_loose_images
        && characters
            .iter()
            .filter(|p| p.is_dir())
            .any(|c| visible_children(c).is_ok_and(|files| files.iter().any(|f| is_png_name(f))))
}

/// Turns one Omniglot PNG (black strokes on white) into an ink map of `height x width`
/// (row-major, ink = 1), exactly as the loader does. `source` names the image in errors.
pub fn preprocess_png(
    bytes: &[u8],
    height: usize,
    width: usize,
    resample: Resample,
    source: &str,
) -> Result<Vec<f32>> {
    let decoded = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .map_err(|e| Error::Data(format!("{source}: not a readable PNG image: {e}")))?;
    let grey = decoded.to_luma8();
    let (w0, h0) = (grey.width() as usize, grey.height() as usize);
    if w0 == 0 || h0 == 0 {
        return Err(Error::Data(format!(
            "{source}: the image is empty (0 pixels)"
        )));
    }
    let ink: Vec<f32> = grey
        .as_raw()
        .iter()
        .map(|&p| 1.0 - p as f32 / 255.0)
        .collect();
    Ok(match resample {
        // Rounding can step a hair outside [0, 1]; ink maps stay inside.
        Resample::Area => area_resize(&ink, h0, w0, height, width)
            .into_iter()
            .map(|v| v.clamp(0.0, 1.0))
            .collect(),
        Resample::Lanczos3 => {
            let buffer = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_raw(
                w0 as u32, h0 as u32, ink,
            )
            .ok_or_else(|| Error::Data(format!("{source}: inconsistent image buffer")))?;
            let resized = image::imageops::resize(
                &buffer,
                width as u32,
                height as u32,
                image::imageops::FilterType::Lanczos3,
            );
            resized
                .into_raw()
                .into_iter()
                .map(|v| v.clamp(0.0, 1.0))
                .collect()
        }
    })
}

/// For each output index along one axis, the input indices and weights (summing to 1) of its
/// footprint `[i·s, (i+1)·s)` with `s = input / output`.
fn area_weights(input: usize, output: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = input as f64 / output as f64;
    (0..output)
        .map(|i| {
            let (start, end) = (i as f64 * scale, (i + 1) as f64 * scale);
            let first = start.floor() as usize;
            let last = (end.ceil() as usize).min(input);
            (first..last)
                .filter_map(|j| {
                    let overlap = (end.min(j as f64 + 1.0) - start.max(j as f64)).max(0.0);
                    (overlap > 0.0).then_some((j, (overlap / scale) as f32))
                })
                .collect()
        })
        .collect()
}

/// Area (box-filter) resize of a row-major single-channel image; works for up- and downscaling.
fn area_resize(src: &[f32], h0: usize, w0: usize, h: usize, w: usize) -> Vec<f32> {
    let rows = area_weights(h0, h);
    let cols = area_weights(w0, w);
    // Columns first into an h0 x w buffer, then rows.
    let mut tmp = vec![0f32; h0 * w];
    for y in 0..h0 {
        let line = &src[y * w0..(y + 1) * w0];
        for (x, taps) in cols.iter().enumerate() {
            tmp[y * w + x] = taps.iter().map(|&(j, wt)| line[j] * wt).sum();
        }
    }
    let mut out = vec![0f32; h * w];
    for (y, taps) in rows.iter().enumerate() {
        for &(j, wt) in taps {
            for x in 0..w {
                out[y * w + x] += tmp[j * w + x] * wt;
            }
        }
    }
    out
}

fn is_png_name(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"))
}

fn is_hidden(component: &str) -> bool {
    component.starts_with('.') || component == "__MACOSX"
}

fn visible_children(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        if !is_hidden(&name.to_string_lossy()) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// One image to decode: its character (`Alphabet/characterNN`), where it came from, its bytes.
struct Entry {
    alphabet: String,
    character: String,
    name: String,
    bytes: Vec<u8>,
}

/// The images of an archive or folder, sorted by alphabet, character and file name.
struct Archive {
    display: String,
    entries: Vec<Entry>,
    /// SHA-256 of the zip bytes, or of the folder's names, sizes and modification times.
    fingerprint: String,
}

impl Archive {
    fn open(path: &Path) -> Result<Self> {
        let mut archive = if path.is_dir() {
            Self::open_folder(path)?
        } else if path.is_file() {
            Self::open_zip(path)?
        } else {
            return Err(Error::Data(format!(
                "{}: no such Omniglot archive or folder; download it with \
                 `metalearn data fetch omniglot`",
                path.display()
            )));
        };
        if archive.entries.is_empty() {
            return Err(Error::Data(format!(
                "{}: holds no images in the Omniglot layout \
                 <root>/<Alphabet>/<characterNN>/<image>.png",
                archive.display
            )));
        }
        archive.entries.sort_by(|a, b| {
            (&a.alphabet, &a.character, &a.name).cmp(&(&b.alphabet, &b.character, &b.name))
        });
        Ok(archive)
    }

    fn open_zip(path: &Path) -> Result<Self> {
        let display = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let fingerprint = hex(&Sha256::digest(&bytes));
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
            Error::Data(format!(
                "{display}: not a readable zip archive ({e}); download it again with \
                 `metalearn data fetch omniglot`"
            ))
        })?;
        let mut entries = Vec::new();
        let mut depth: Option<(usize, String)> = None;
        for index in 0..zip.len() {
            let mut file = zip.by_index(index).map_err(|e| {
                Error::Data(format!("{display}: entry #{index} cannot be read: {e}"))
            })?;
            let name = file
                .name()
                .map_err(|e| Error::Data(format!("{display}: entry #{index} has a bad name: {e}")))?
                .into_owned();
            if file.is_dir() || name.ends_with('/') {
                continue;
            }
            let parts: Vec<&str> = name.split('/').filter(|p| !p.is_empty()).collect();
            if parts.iter().any(|p| is_hidden(p)) {
                continue;
            }
            let unexpected = || {
                Error::Data(format!(
                    "{display}: unexpected entry `{name}`: Omniglot archives hold only \
                     <root>/<Alphabet>/<characterNN>/<image>.png"
                ))
            };
            if !is_png_name(Path::new(&name)) || !(3..=4).contains(&parts.len()) {
                return Err(unexpected());
            }
            match &depth {
                None => depth = Some((parts.len(), name.clone())),
                Some((d, first)) if *d != parts.len() => {
                    return Err(Error::Data(format!(
                        "{display}: entry `{name}` is {} folders deep but `{first}` is {}; \
                         every image must be at <root>/<Alphabet>/<characterNN>/<image>.png",
                        parts.len() - 1,
                        d - 1
                    )))
                }
                Some(_) => {}
            }
            let n = parts.len();
            let mut bytes = Vec::with_capacity(file.size() as usize);
            file.read_to_end(&mut bytes).map_err(|e| {
                Error::Data(format!(
                    "{display}: entry `{name}` is corrupt ({e}); download the archive again"
                ))
            })?;
            entries.push(Entry {
                alphabet: parts[n - 3].to_string(),
                character: parts[n - 2].to_string(),
                name: format!("{display}: entry `{name}`"),
                bytes,
            });
        }
        Ok(Self {
            display,
            entries,
            fingerprint,
        })
    }

    fn open_folder(root: &Path) -> Result<Self> {
        let display = root.display().to_string();
        let mut entries = Vec::new();
        let mut hasher = Sha256::new();
        let unexpected = |p: &Path| {
            Error::Data(format!(
                "{}: unexpected file in an Omniglot folder; expected only \
                 <root>/<Alphabet>/<characterNN>/<image>.png",
                p.display()
            ))
        };
        for alphabet in visible_children(root)? {
            if !alphabet.is_dir() {
                return Err(unexpected(&alphabet));
            }
            for character in visible_children(&alphabet)? {
                if !character.is_dir() {
                    return Err(unexpected(&character));
                }
                for file in visible_children(&character)? {
                    if !file.is_file() || !is_png_name(&file) {
                        return Err(unexpected(&file));
                    }
                    let meta = std::fs::metadata(&file).map_err(|e| Error::io(&file, e))?;
                    let modified = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_nanos());
                    let relative = file.strip_prefix(root).unwrap_or(&file);
                    hasher.update(relative.to_string_lossy().as_bytes());
                    hasher.update(meta.len().to_le_bytes());
                    hasher.update(modified.to_le_bytes());
                    let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
                    let file_name = |p: &Path| {
                        p.file_name()
                            .map(|s| s.to_string_lossy().into_owned())
                            .unwrap_or_default()
                    };
                    entries.push(Entry {
                        alphabet: file_name(&alphabet),
                        character: file_name(&character),
                        name: file.display().to_string(),
                        bytes,
                    });
                }
            }
        }
        Ok(Self {
            display,
            entries,
            fingerprint: format!("folder-{}", hex(&hasher.finalize())),
        })
    }

    /// Decodes and resizes every image (in parallel).
    fn decode(&self, options: &OmniglotOptions) -> Result<BaseImages> {
        let (h, w, resample) = (options.height, options.width, options.resample);
        let decoded: Vec<Vec<f32>> = self
            .entries
            .par_iter()
            .map(|e| preprocess_png(&e.bytes, h, w, resample, &e.name))
            .collect::<Result<_>>()?;
        let mut alphabets: Vec<String> = Vec::new();
        let mut class_names: Vec<String> = Vec::new();
        let mut groups = Vec::new();
        let mut labels = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            if alphabets.last() != Some(&e.alphabet) {
                alphabets.push(e.alphabet.clone());
            }
            let class = format!("{}/{}", e.alphabet, e.character);
            if class_names.last() != Some(&class) {
                class_names.push(class);
                groups.push(alphabets.len() - 1);
            }
            labels.push(class_names.len() - 1);
        }
        Ok(BaseImages {
            height: h,
            width: w,
            pixels: decoded.concat(),
            labels,
            class_names,
            groups,
            alphabets,
        })
    }
}

/// Decoded, unrotated images: what the cache holds.
#[derive(Debug, PartialEq)]
struct BaseImages {
    height: usize,
    width: usize,
    pixels: Vec<f32>,
    labels: Vec<usize>,
    class_names: Vec<String>,
    groups: Vec<usize>,
    alphabets: Vec<String>,
}

impl BaseImages {
    fn into_data(self, options: &OmniglotOptions) -> Result<OmniglotData> {
        let (h, w) = (self.height, self.width);
        let n = self.labels.len();
        let classes = self.class_names.len();
        let mut pixels = self.pixels;
        let mut labels = self.labels;
        let mut class_names = self.class_names;
        let mut groups = self.groups;
        let mut base_class: Vec<usize> = (0..classes).collect();
        let variants = extra_classes(options);
        pixels.reserve(variants.len() * n * h * w);
        for (k, (suffix, variant)) in variants.iter().enumerate() {
            for i in 0..n {
                let copy = variant.apply(pixels[i * h * w..(i + 1) * h * w].to_vec(), h, w);
                pixels.extend_from_slice(&copy);
                labels.push(labels[i] + (k + 1) * classes);
            }
            for c in 0..classes {
                class_names.push(format!("{}/{suffix}", class_names[c]));
                groups.push(groups[c]);
                base_class.push(c);
            }
        }
        let count = labels.len();
        let images = Tensor::from_vec(pixels, (count, 1, h, w), &Device::Cpu)?;
        Ok(OmniglotData {
            images,
            labels,
            class_names,
            groups,
            alphabets: self.alphabets,
            base_class,
        })
    }
}

/// What identifies a cache file's content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct CacheKey {
    source: String,
    height: usize,
    width: usize,
    resample: Resample,
}

impl CacheKey {
    fn file_name(&self) -> String {
        let short = self.source.trim_start_matches("folder-");
        format!(
            "omniglot-{}-{}x{}-{}.bin",
            &short[..short.len().min(32)],
            self.height,
            self.width,
            self.resample.name()
        )
    }
}

/// The JSON header of a cache file.
#[derive(Debug, Serialize, Deserialize)]
struct CacheHeader {
    key: CacheKey,
    count: usize,
    class_names: Vec<String>,
    groups: Vec<usize>,
    alphabets: Vec<String>,
}

const CACHE_MAGIC: &[u8; 8] = b"MLOMNI01";
const CHECKSUM_LEN: usize = 32;

/// Candidate cache folders in order of preference, or None when caching is off.
fn cache_dirs(archive: &Path, policy: &CachePolicy) -> Option<Vec<PathBuf>> {
    match policy {
        CachePolicy::Off => None,
        CachePolicy::Dir(dir) => Some(vec![dir.clone()]),
        CachePolicy::Default => {
            let parent = archive
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let mut dirs = vec![parent.join(".metalearn-cache")];
            let user = std::env::var_os("XDG_CACHE_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
            if let Some(user) = user {
                dirs.push(user.join("metalearn"));
            }
            Some(dirs)
        }
    }
}

fn load_through_cache(
    archive: &Archive,
    options: &OmniglotOptions,
    key: &CacheKey,
    dirs: &[PathBuf],
    policy: &CachePolicy,
) -> Result<(BaseImages, CacheOutcome)> {
    let name = key.file_name();
    let mut rejected: Option<(PathBuf, String)> = None;
    for dir in dirs {
        let path = dir.join(&name);
        if !path.exists() {
            continue;
        }
        match read_cache(&path, key) {
            Ok(images) => return Ok((images, CacheOutcome::Hit(path))),
            Err(reason) => {
                rejected.get_or_insert((path, reason));
            }
        }
    }
    let images = archive.decode(options)?;
    let bytes = encode_cache(&images, key)?;
    // Rewrite a rejected file where it was; otherwise take the first folder that can be written.
    let targets: Vec<PathBuf> = match &rejected {
        Some((path, _)) => std::iter::once(path.clone())
            .chain(dirs.iter().map(|d| d.join(&name)))
            .collect(),
        None => dirs.iter().map(|d| d.join(&name)).collect(),
    };
    let mut last_error = String::new();
    for path in targets {
        match atomic_write(&path, &bytes) {
            Ok(()) => {
                let outcome = match rejected {
                    Some((_, reason)) => CacheOutcome::Rebuilt { path, reason },
                    None => CacheOutcome::Written(path),
                };
                return Ok((images, outcome));
            }
            Err(e) => last_error = e.to_string(),
        }
    }
    if let CachePolicy::Dir(dir) = policy {
        return Err(Error::Config(format!(
            "cannot write the Omniglot cache in {}: {last_error}; choose a writable cache folder",
            dir.display()
        )));
    }
    Ok((images, CacheOutcome::NotWritten(last_error)))
}

fn encode_cache(images: &BaseImages, key: &CacheKey) -> Result<Vec<u8>> {
    let header = CacheHeader {
        key: key.clone(),
        count: images.labels.len(),
        class_names: images.class_names.clone(),
        groups: images.groups.clone(),
        alphabets: images.alphabets.clone(),
    };
    let header = serde_json::to_vec(&header)
        .map_err(|e| Error::Data(format!("cannot encode the Omniglot cache header: {e}")))?;
    let mut out = Vec::with_capacity(
        16 + header.len() + 4 * images.labels.len() + 4 * images.pixels.len() + CHECKSUM_LEN,
    );
    out.extend_from_slice(CACHE_MAGIC);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for &label in &images.labels {
        out.extend_from_slice(&(label as u32).to_le_bytes());
    }
    for &p in &images.pixels {
        out.extend_from_slice(&p.to_le_bytes());
    }
    let checksum = Sha256::digest(&out);
    out.extend_from_slice(&checksum);
    Ok(out)
}

/// Reads and checks a cache file; the error is the reason it cannot be used.
fn read_cache(path: &Path, key: &CacheKey) -> std::result::Result<BaseImages, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() < 16 + CHECKSUM_LEN || &bytes[..8] != CACHE_MAGIC {
        return Err("not an Omniglot cache file of this version".into());
    }
    let (body, checksum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    let header_len = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes")) as usize;
    let header_end = 16usize
        .checked_add(header_len)
        .filter(|&e| e <= body.len())
        .ok_or("truncated header")?;
    let header: CacheHeader = serde_json::from_slice(&body[16..header_end])
        .map_err(|e| format!("unreadable header: {e}"))?;
    if &header.key != key {
        return Err("made from other data or with other options".into());
    }
    let count = header.count;
    let per_image = key.height * key.width;
    // `count` comes from the file: a corrupt value must not overflow.
    let expected = count
        .checked_mul(per_image)
        .and_then(|n| n.checked_add(count))
        .and_then(|n| n.checked_mul(4))
        .and_then(|n| n.checked_add(header_end))
        .ok_or("impossible image count")?;
    if body.len() != expected {
        return Err(format!(
            "wrong length: {} bytes where {} were expected",
            bytes.len(),
            expected + CHECKSUM_LEN
        ));
    }
    if Sha256::digest(body).as_slice() != checksum {
        return Err("checksum mismatch".into());
    }
    let classes = header.class_names.len();
    let labels: Vec<usize> = body[header_end..header_end + 4 * count]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as usize)
        .collect();
    if labels.iter().any(|&l| l >= classes)
        || header.groups.len() != classes
        || header.groups.iter().any(|&g| g >= header.alphabets.len())
    {
        return Err("inconsistent class or alphabet ids".into());
    }
    let pixels: Vec<f32> = body[header_end + 4 * count..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    Ok(BaseImages {
        height: key.height,
        width: key.width,
        pixels,
        labels,
        class_names: header.class_names,
        groups: header.groups,
        alphabets: header.alphabets,
    })
}

/// Lower-case hexadecimal digits of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_resize_preserves_mean_and_constant_images() {
        let src: Vec<f32> = (0..105 * 105).map(|i| (i % 7) as f32 / 6.0).collect();
        let out = area_resize(&src, 105, 105, 28, 28);
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean(&src) - mean(&out)).abs() < 1e-3);
        let ones = area_resize(&vec![1.0; 105 * 105], 105, 105, 28, 28);
        assert!(ones.iter().all(|&v| (v - 1.0).abs() < 1e-5));
        let weights = area_weights(105, 28);
        for taps in weights {
            let total: f32 = taps.iter().map(|t| t.1).sum();
            assert!((total - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn variants_mirror_then_turn_and_are_named_in_class_order() {
        let src: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let mirror = Variant {
            mirrored: true,
            quarter_turns: 0,
        };
        // 0 1 2 / 3 4 5 mirrored: 2 1 0 / 5 4 3 (non-square images can be mirrored).
        assert_eq!(mirror.apply(src, 2, 3), vec![2., 1., 0., 5., 4., 3.]);
        let square: Vec<f32> = (0..4).map(|i| i as f32).collect();
        let mirror_turn = Variant {
            mirrored: true,
            quarter_turns: 1,
        };
        // 0 1 / 2 3 mirrored: 1 0 / 3 2, then turned clockwise: 3 1 / 2 0.
        assert_eq!(mirror_turn.apply(square, 2, 2), vec![3., 1., 2., 0.]);
        let names = |rotations, reflections| {
            let options = OmniglotOptions {
                rotations,
                reflections,
                ..OmniglotOptions::default()
            };
            extra_classes(&options)
                .into_iter()
                .map(|(suffix, _)| suffix)
                .collect::<Vec<_>>()
        };
        assert!(names(false, false).is_empty());
        assert_eq!(names(true, false), ["rot90", "rot180", "rot270"]);
        assert_eq!(names(false, true), ["mirror"]);
        assert_eq!(
            names(true, true),
            [
                "rot90",
                "rot180",
                "rot270",
                "mirror",
                "mirror-rot90",
                "mirror-rot180",
                "mirror-rot270"
            ]
        );
    }

    #[test]
    fn resample_names_parse() {
        assert_eq!("area".parse::<Resample>().unwrap(), Resample::Area);
        assert_eq!("Lanczos3".parse::<Resample>().unwrap(), Resample::Lanczos3);
        assert!("cubic".parse::<Resample>().is_err());
    }
}
