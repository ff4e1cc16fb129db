//! `--model` resolution: a local directory, a single weights file, or a Hugging Face Hub repo id resolved through
//! the same cache the Python libraries use (~/.cache/huggingface/hub; HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE,
//! HF_TOKEN honoured).

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{BeitError, Result};

/// Weight files in transformers' order of preference.
pub const WEIGHT_FILES: [&str; 5] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "flax_model.msgpack",
];

/// How a Hub repo id is fetched: revision, cache, offline mode, token (as huggingface_hub).
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Branch, tag or commit ("main").
    pub revision: String,
    /// The hub cache (the directory holding models--org--name).
    pub cache_dir: PathBuf,
    /// Use only what is cached (HF_HUB_OFFLINE).
    pub offline: bool,
    /// Access token for gated or private repos (HF_TOKEN or the cached login).
    pub token: Option<String>,
    /// Show download progress bars.
    pub progress: bool,
}

impl HubOptions {
    /// What huggingface_hub would use: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub.
    pub fn from_env() -> Self {
        let cache_dir = match (std::env::var_os("HF_HUB_CACHE"), std::env::var_os("HF_HOME")) {
            (Some(c), _) => PathBuf::from(c),
            (None, Some(h)) => PathBuf::from(h).join("hub"),
            (None, None) => Cache::default().path().clone(),
        };
        let truthy = |v: Option<String>| v.is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()).or_else(|| Cache::new(cache_dir.clone()).token());
        HubOptions {
            revision: "main".into(),
            cache_dir,
            offline: truthy(std::env::var("HF_HUB_OFFLINE").ok()),
            token,
            progress: true,
        }
    }
}

/// Where a model's files are: a directory, plus the weights file when the user named one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLocation {
    /// The directory holding config.json and the weights.
    pub dir: PathBuf,
    /// The weights file the spec named, if it named one.
    pub weights_file: Option<PathBuf>,
}

fn is_repo_id(s: &str) -> bool {
    let ok = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !p.starts_with('.');
    let parts: Vec<&str> = s.split('/').collect();
    matches!(parts.len(), 1 | 2) && parts.iter().all(|p| ok(p))
}

/// Where `spec` (a directory, a weights file, or a Hub repo id, fetched into the cache) puts a model's files.
pub fn resolve_model(spec: &str, opts: &HubOptions) -> Result<ModelLocation> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(ModelLocation { dir: path.to_path_buf(), weights_file: None });
    }
    if path.is_file() {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        return Ok(ModelLocation { dir, weights_file: Some(path.to_path_buf()) });
    }
    if !is_repo_id(spec) || spec.starts_with('/') || spec.starts_with("./") {
        return Err(BeitError::invalid_input(
            "model",
            format!("{spec:?} is not a directory, a weights file, or a Hub repo id like microsoft/beit-base-patch16-224"),
        ));
    }
    if opts.offline {
        resolve_cached(spec, opts)
    } else {
        download(spec, opts)
    }
}

/// A snapshot directory of the cache (models--org--name/snapshots/<commit>), as Python's cache lays it out.
fn resolve_cached(id: &str, opts: &HubOptions) -> Result<ModelLocation> {
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, opts.revision.clone());
    let cache = Cache::new(opts.cache_dir.clone()).repo(repo.clone());
    let missing = || BeitError::checkpoint(
        opts.cache_dir.join(repo.folder_name()),
        format!(
            "offline (HF_HUB_OFFLINE) and {id}@{} is not in the cache: it needs config.json and one of {}",
            opts.revision,
            WEIGHT_FILES.join(", ")
        ),
    );
    let config = match cache.get("config.json") {
        Some(p) => p,
        // A revision given as a commit hash has no refs/ entry: look for its snapshot directly.
        None => {
            let p = opts.cache_dir.join(repo.folder_name()).join("snapshots").join(&opts.revision).join("config.json");
            if p.is_file() { p } else { return Err(missing()) }
        }
    };
    let dir = config.parent().map(Path::to_path_buf).ok_or_else(missing)?;
    if !WEIGHT_FILES.iter().any(|f| dir.join(f).is_file()) {
        return Err(missing());
    }
    Ok(ModelLocation { dir, weights_file: None })
}

fn download(id: &str, opts: &HubOptions) -> Result<ModelLocation> {
    let hub_err = |file: &str, e: hf_hub::api::sync::ApiError| {
        BeitError::checkpoint(
            format!("{id}/{file}"),
            format!("could not fetch from the Hub ({e}); looked in the cache {} first", opts.cache_dir.display()),
        )
    };
    let api = hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
        .with_token(opts.token.clone())
        .with_progress(opts.progress)
        .build()
        .map_err(|e| hub_err("config.json", e))?;
    let repo = api.repo(Repo::with_revision(id.to_string(), RepoType::Model, opts.revision.clone()));
    let config = repo.get("config.json").map_err(|e| hub_err("config.json", e))?;
    let _ = repo.get("preprocessor_config.json"); // optional: processor defaults apply without it
    let mut last_err = None;
    for file in WEIGHT_FILES {
        match repo.get(file) {
            Ok(path) => {
                if file.ends_with(".index.json") {
                    for shard in crate::checkpoint::shard_names(&path)? {
                        repo.get(&shard).map_err(|e| hub_err(&shard, e))?;
                    }
                }
                let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
                return Ok(ModelLocation { dir, weights_file: None });
            }
            Err(e) => last_err = Some((file, e)),
        }
    }
    match last_err {
        Some((file, e)) => Err(hub_err(file, e)),
        None => Err(BeitError::checkpoint(id, "no weights found")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(is_repo_id("microsoft/beit-base-patch16-224"));
        assert!(is_repo_id("gpt2"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("../x"));
        assert!(!is_repo_id(""));
    }
}
