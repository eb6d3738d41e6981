//! Pooled features of image files through a backbone: decoding and preprocessing in parallel,
//! forward passes in batches, unreadable images skipped and counted on request, and a cache of
//! the features of a whole list (keyed by the backbone's weights, the preprocessing and every
//! file's path, size and modification time) so that scoring the same test set again costs a
//! file read.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::vision::backbone::{Backbone, Preprocess};
use crate::vision::image::{decode_rgb, enlarged_input, photo_input};

/// How images are embedded.
#[derive(Clone, Debug)]
pub struct EmbedOptions {
    /// Images per forward pass.
    pub batch_size: usize,
    /// Skip (and count) images that cannot be read instead of stopping at the first.
    pub skip_bad_images: bool,
    /// Where whole-list feature caches are kept; `None`: no cache.
    pub cache: Option<PathBuf>,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            batch_size: 32,
            skip_bad_images: false,
            cache: default_cache_dir(),
        }
    }
}

/// `$METALEARN_CACHE/features`, else `$XDG_CACHE_HOME/metalearn/features` or
/// `~/.cache/metalearn/features`; `METALEARN_CACHE=off` turns caching off.
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("METALEARN_CACHE") {
        if dir == "off" {
            return None;
        }
        return Some(PathBuf::from(dir).join("features"));
    }
    var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("metalearn").join("features"))
}

/// Features of a list of images.
#[derive(Clone, Debug)]
pub struct Embedded {
    /// `[kept, feature_dim]`, f32.
    pub features: Tensor,
    /// Which of the given images each row belongs to.
    pub kept: Vec<usize>,
    /// Images that could not be read, with the reason (only with `skip_bad_images`).
    pub skipped: Vec<(PathBuf, String)>,
    /// Whether the features came from the cache.
    pub cached: bool,
}

/// The network input of one image file: photos are resized on their shorter side and
/// centre-cropped; images no larger than the input (Fashion-MNIST, Omniglot) are enlarged to
/// it directly with bilinear interpolation, as the few-shot protocols do.
pub fn image_input(path: &Path, preprocess: &Preprocess) -> Result<Vec<f32>> {
    input_of(&decode_rgb(path)?, preprocess)
        .map_err(|e| Error::Data(format!("{}: {e}", path.display())))
}

/// [`image_input`] of a decoded image.
pub fn input_of(image: &RgbImage, preprocess: &Preprocess) -> Result<Vec<f32>> {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::Data("the image has no pixels".into()));
    }
    if w as usize <= preprocess.size && h as usize <= preprocess.size {
        return Ok(enlarged_input(image, preprocess));
    }
    photo_input(image, preprocess)
}

/// Embeds `paths` with `backbone` (pooled features, inference mode); `progress` is told the
/// number of images done after every batch.
pub fn embed_images(
    backbone: &Backbone,
    paths: &[PathBuf],
    options: &EmbedOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<Embedded> {
    if options.batch_size == 0 {
        return Err(Error::Config("--batch-size must be at least 1".into()));
    }
    let key = match &options.cache {
        Some(_) => Some(cache_key(backbone, paths, options.skip_bad_images)?),
        None => None,
    };
    if let (Some(dir), Some(key)) = (&options.cache, &key) {
        if let Some(found) = read_cache(&dir.join(format!("{key}.safetensors")), paths.len()) {
            progress(paths.len());
            return Ok(found);
        }
    }
    let size = backbone.preprocess.size;
    let per_image = 3 * size * size;
    let device = backbone.device();
    let mut rows: Vec<Tensor> = Vec::new();
    let mut kept = Vec::with_capacity(paths.len());
    let mut skipped = Vec::new();
    for (batch_index, batch) in paths.chunks(options.batch_size).enumerate() {
        let first = batch_index * options.batch_size;
        let inputs: Vec<Result<Vec<f32>>> = batch
            .par_iter()
            .map(|p| image_input(p, &backbone.preprocess))
            .collect();
        let mut values = Vec::with_capacity(batch.len() * per_image);
        let mut count = 0;
        for (i, input) in inputs.into_iter().enumerate() {
            match input {
                Ok(v) => {
                    values.extend(v);
                    kept.push(first + i);
                    count += 1;
                }
                Err(e) if options.skip_bad_images => {
                    skipped.push((batch[i].clone(), e.to_string()))
                }
                Err(e) => return Err(e),
            }
        }
        if count > 0 {
            let x = Tensor::from_vec(values, (count, 3, size, size), &device)?;
            rows.push(backbone.features(&x)?.to_dtype(DType::F32)?);
        }
        progress(first + batch.len());
    }
    if kept.is_empty() {
        return Err(Error::Data(format!(
            "none of the {} images could be read{}",
            paths.len(),
            skipped
                .first()
                .map(|(p, e)| format!(" (first: {}: {e})", p.display()))
                .unwrap_or_default()
        )));
    }
    let features = Tensor::cat(&rows, 0)?;
    let embedded = Embedded {
        features,
        kept,
        skipped,
        cached: false,
    };
    if let (Some(dir), Some(key)) = (&options.cache, &key) {
        // A cache that cannot be written only costs time next run.
        let _ = write_cache(&dir.join(format!("{key}.safetensors")), &embedded);
    }
    Ok(embedded)
}

/// The cache key: the backbone's feature weights and statistics, its preprocessing, and each
/// file's path, size and modification time.
fn cache_key(backbone: &Backbone, paths: &[PathBuf], skip_bad: bool) -> Result<String> {
    let mut hash = Sha256::new();
    hash.update(b"metalearn features v1\n");
    hash.update(backbone.name.as_bytes());
    hash.update(serde_json::to_vec(&backbone.preprocess).unwrap_or_default());
    hash.update(backbone.network.architecture().to_json().as_bytes());
    hash.update([skip_bad as u8]);
    let arch = backbone.network.architecture();
    let feature_layers: Vec<&str> = arch.layers[..backbone.feature_layers]
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    for set in [&backbone.params, &backbone.stats] {
        for (name, t) in set.iter() {
            let layer = name.split('.').next().unwrap_or_default();
            if !feature_layers.contains(&layer) {
                continue;
            }
            hash.update(name.as_bytes());
            for v in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
                hash.update(v.to_le_bytes());
            }
        }
    }
    for path in paths {
        let meta = std::fs::metadata(path).ok();
        let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        hash.update(absolute.to_string_lossy().as_bytes());
        hash.update(meta.as_ref().map_or(0, |m| m.len()).to_le_bytes());
        let modified = meta
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        hash.update(modified.to_le_bytes());
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn read_cache(path: &Path, images: usize) -> Option<Embedded> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).ok()?;
    let features = tensors.get("features")?.clone();
    let kept: Vec<usize> = tensors
        .get("kept")?
        .to_vec1::<u32>()
        .ok()?
        .into_iter()
        .map(|i| i as usize)
        .collect();
    if kept.len() != features.dim(0).ok()? || kept.iter().any(|&i| i >= images) {
        return None;
    }
    // Skipped images are not kept in the cache: a list with skips is embedded again.
    Some(Embedded {
        features,
        kept,
        skipped: Vec::new(),
        cached: true,
    })
}

fn write_cache(path: &Path, embedded: &Embedded) -> Result<()> {
    if !embedded.skipped.is_empty() {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let kept: Vec<u32> = embedded.kept.iter().map(|&i| i as u32).collect();
    let kept = Tensor::from_vec(kept, embedded.kept.len(), &Device::Cpu)?;
    let tensors = [("features", embedded.features.clone()), ("kept", kept)];
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.to_string(), t)), None)
        .map_err(|e| Error::Data(format!("cannot write the feature cache: {e}")))?;
    crate::fsutil::atomic_write(path, &bytes)
}
