//! Models by name from the Hugging Face Hub (`hf:OWNER/MODEL`, optionally `@REVISION`),
//! through the `hf-hub` crate and its standard cache (`$HF_HOME/hub`, default
//! `~/.cache/huggingface/hub`), so a model downloaded by Python's `huggingface_hub` is found
//! here and the other way round. Sentence encoders (`text::hub`) and image backbones
//! (`vision::backbone`) fetch their files through it.
//!
//! The environment is read as the Python tools read it: `HF_ENDPOINT` (a mirror or a local
//! server), `HF_HOME` and `HF_HUB_CACHE` (where the cache lives), `HF_TOKEN` (private models)
//! and `HF_HUB_OFFLINE=1` (use only what the cache holds; never touch the network).

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// The prefix that marks a Hub name where a folder is expected.
pub const HUB_PREFIX: &str = "hf:";

/// How to reach the Hub and where its cache is.
#[derive(Clone, Debug, Default)]
pub struct HubOptions {
    /// Base URL of the Hub (`https://huggingface.co` when `None`).
    pub endpoint: Option<String>,
    /// The cache folder (the `hub` folder itself); the standard one when `None`.
    pub cache_dir: Option<PathBuf>,
    /// Use only the cache.
    pub offline: bool,
    /// An access token for private or gated models.
    pub token: Option<String>,
}

impl HubOptions {
    /// Options from the standard environment variables (`HF_ENDPOINT`, `HF_HOME`,
    /// `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_TOKEN`).
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let offline = var("HF_HUB_OFFLINE")
            .map(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
            .unwrap_or(false);
        Self {
            endpoint: var("HF_ENDPOINT").map(|e| e.trim_end_matches('/').to_string()),
            cache_dir: var("HF_HUB_CACHE")
                .map(PathBuf::from)
                .or_else(|| var("HF_HOME").map(|home| PathBuf::from(home).join("hub"))),
            offline,
            token: var("HF_TOKEN"),
        }
    }

    pub(crate) fn cache(&self) -> Cache {
        match &self.cache_dir {
            Some(dir) => Cache::new(dir.clone()),
            None => Cache::from_env(),
        }
    }
}

/// A Hub model name and revision, parsed from `hf:NAME[@REVISION]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubName {
    /// `owner/model` (or a bare model name).
    pub repo: String,
    /// A branch, tag or commit; `main` when not given.
    pub revision: String,
}

impl HubName {
    /// Parses `hf:NAME[@REVISION]`; `None` when `spec` does not start with `hf:`.
    pub fn parse(spec: &str) -> Option<Result<Self>> {
        let rest = spec.strip_prefix(HUB_PREFIX)?;
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, revision)) => (repo, revision),
            None => (rest, "main"),
        };
        let valid_part = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() > 2 || !parts.iter().all(|p| valid_part(p)) || revision.is_empty() {
            return Some(Err(Error::Config(format!(
                "`{spec}` is not a Hub model name; write hf:OWNER/MODEL or hf:OWNER/MODEL@REVISION, \
                 e.g. hf:sentence-transformers/all-MiniLM-L6-v2"
            ))));
        }
        Some(Ok(Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
        }))
    }

    pub(crate) fn hub_repo(&self) -> Repo {
        Repo::with_revision(self.repo.clone(), RepoType::Model, self.revision.clone())
    }
}

impl std::fmt::Display for HubName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.revision == "main" {
            write!(f, "{HUB_PREFIX}{}", self.repo)
        } else {
            write!(f, "{HUB_PREFIX}{}@{}", self.repo, self.revision)
        }
    }
}

/// Where one file of the model is fetched from: the network (through the cache) or the cache
/// alone.
pub(crate) enum Source {
    Online(ApiRepo),
    Offline(hf_hub::CacheRepo),
}

/// What fetching one file gave.
pub enum Fetched {
    /// The file's path in the cache.
    Found(PathBuf),
    /// The Hub (or, offline, the cache) has no such file.
    Absent,
}

impl Source {
    pub fn fetch(&self, name: &HubName, file: &str, options: &HubOptions) -> Result<Fetched> {
        match self {
            Source::Offline(cache) => Ok(cache.get(file).map_or(Fetched::Absent, Fetched::Found)),
            Source::Online(api) => match api.get(file) {
                Ok(path) => Ok(Fetched::Found(path)),
                Err(ApiError::RequestError(e)) => {
                    let message = e.to_string();
                    match (*e).into_response().map(|response| response.status()) {
                        Some(404) => Ok(Fetched::Absent),
                        status => Err(hub_error(name, file, options, &message, Some(status))),
                    }
                }
                Err(e) => Err(hub_error(name, file, options, &e.to_string(), None)),
            },
        }
    }
}

/// The error for a failed request: `request` is `Some(HTTP status)` for a request that failed
/// (`Some(None)`: the server was not reached), `None` for a failure after the request.
fn hub_error(
    name: &HubName,
    file: &str,
    options: &HubOptions,
    message: &str,
    request: Option<Option<u16>>,
) -> Error {
    let endpoint = options
        .endpoint
        .as_deref()
        .unwrap_or("https://huggingface.co");
    let hint = match request {
        Some(Some(401 | 403)) => {
            "the model is private or gated: set HF_TOKEN to an access token that may read it"
        }
        Some(Some(_)) => "the Hub answered with an error; try again later",
        Some(None) => {
            "the Hub could not be reached; check the network (or HF_ENDPOINT), set \
             HF_HUB_OFFLINE=1 to use a model already in the cache, or pass a local folder"
        }
        None => "the download failed; delete the partial files in the cache and try again",
    };
    Error::Data(format!(
        "{name}: could not fetch {file} from {endpoint}: {message}; {hint}"
    ))
}

/// Where the files of `name` come from under `options`: the network through the cache, or the
/// cache alone when offline.
pub fn source(name: &HubName, options: &HubOptions) -> Result<HubSource> {
    let cache = options.cache();
    if options.offline {
        return Ok(HubSource(Source::Offline(cache.repo(name.hub_repo()))));
    }
    let mut builder = ApiBuilder::from_cache(cache)
        .with_progress(false)
        .with_retries(2);
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    if options.token.is_some() {
        builder = builder.with_token(options.token.clone());
    }
    let api = builder
        .build()
        .map_err(|e| Error::Data(format!("{name}: cannot use the Hub cache: {e}")))?;
    Ok(HubSource(Source::Online(api.repo(name.hub_repo()))))
}

/// The files of one Hub model, fetched one at a time (see [`source`]).
pub struct HubSource(Source);

impl HubSource {
    /// One file: its path in the cache, or [`Fetched::Absent`] when the model has none.
    pub fn fetch(&self, name: &HubName, file: &str, options: &HubOptions) -> Result<Fetched> {
        self.0.fetch(name, file, options)
    }
}

/// Fetches `required` (each must exist; `missing(file)` says why it matters when it does not)
/// and `optional` files of `name`, and returns the snapshot folder that holds them.
pub fn download_files(
    name: &HubName,
    required: &[&str],
    optional: &[&str],
    options: &HubOptions,
    missing: &dyn Fn(&str) -> Error,
) -> Result<PathBuf> {
    let source = source(name, options)?;
    let mut folder: Option<PathBuf> = None;
    for file in required {
        match source.fetch(name, file, options)? {
            Fetched::Found(path) => {
                folder.get_or_insert_with(|| {
                    path.parent().map(Path::to_path_buf).unwrap_or_default()
                });
            }
            Fetched::Absent => return Err(missing(file)),
        }
    }
    for file in optional {
        source.fetch(name, file, options)?;
    }
    Ok(folder.unwrap_or_default())
}

/// Why a file is missing when offline, or `None` online.
pub fn offline_reason(options: &HubOptions) -> Option<String> {
    options.offline.then(|| {
        format!(
            "HF_HUB_OFFLINE is set and the cache ({}) does not hold it; download it once \
             online, or unset HF_HUB_OFFLINE",
            options.cache().path().display()
        )
    })
}
