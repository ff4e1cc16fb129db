//! Hugging Face datasets stored as parquet, as the Hub stores them: `DIR/data/train-00000-of-00001.parquet` and
//! `validation-*` / `test-*` beside it (also `DIR/train/*.parquet`, the Hub's `refs/convert/parquet` layout, and
//! `DIR/<config>/train-*.parquet` when one config is present). Image columns are structs of `bytes` and `path`;
//! classification has a `label` column whose ClassLabel names come from the dataset's metadata (the `huggingface`
//! key of the parquet schema metadata, else `README.md`'s `dataset_info`), segmentation an `image` and an
//! `annotation` column. Images decode with [`crate::processor::loader`] (Pillow-exact, on every core).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use parquet::schema::types::Type;
use rayon::prelude::*;

use super::data::{ImageFolder, Split};
use super::seg_data::{Mask, SegDataset};
use crate::error::{BeitError, Result};
use crate::processor::decode_label_map;
use crate::processor::loader::{load_ordered, ImageSource, LoaderOptions};

/// Image columns, by the names datasets use (beans, cifar10, sidewalk-semantic).
const IMAGE_COLUMNS: [&str; 3] = ["image", "img", "pixel_values"];
/// Label columns of classification datasets; otherwise the first ClassLabel feature (cifar100's `fine_label`).
const LABEL_COLUMNS: [&str; 2] = ["label", "labels"];
/// Mask columns of segmentation datasets (scene_parse_150's `annotation`), taken when they hold images.
const MASK_COLUMNS: [&str; 5] = ["annotation", "label", "mask", "semantic_segmentation", "segmentation_mask"];

/// The splits a file can belong to, in reading order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SplitKind {
    Train,
    Validation,
    Test,
    Other,
}

/// A split's name, whole or as the prefix of a shard name (`train-00000-of-00001`, `validation_0`).
fn split_of(name: &str) -> SplitKind {
    let name = name.to_ascii_lowercase();
    let names: [(&str, SplitKind); 8] = [
        ("training", SplitKind::Train),
        ("train", SplitKind::Train),
        ("validation", SplitKind::Validation),
        ("valid", SplitKind::Validation),
        ("val", SplitKind::Validation),
        ("dev", SplitKind::Validation),
        ("testing", SplitKind::Test),
        ("test", SplitKind::Test),
    ];
    for (prefix, kind) in names {
        if let Some(rest) = name.strip_prefix(prefix) {
            if rest.is_empty() || rest.starts_with(['-', '_', '.']) {
                return kind;
            }
        }
    }
    SplitKind::Other
}

/// One parquet file of a dataset.
#[derive(Clone, Debug)]
struct DataFile {
    path: PathBuf,
    split: SplitKind,
}

impl DataFile {
    /// What a row is called in errors and results: `DIR/data/train-00000-of-00001.parquet row 17` (0-based).
    fn row_name(&self, row: usize) -> String {
        format!("{} row {row}", self.path.display())
    }
}

fn is_parquet(p: &Path) -> bool {
    p.is_file() && p.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| BeitError::io(dir, e))? {
        let p = e.map_err(|e| BeitError::io(dir, e))?.path();
        // .cache, .git and the like are never data.
        if !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

fn stem(p: &Path) -> &str {
    p.file_stem().and_then(|s| s.to_str()).unwrap_or_default()
}

/// The parquet files of `path` grouped by config ("" for the default one, which the Hub keeps in `data/`).
/// Only the layouts the Hub writes are looked at, so that a large image folder is not walked to find out.
fn find_files(path: &Path) -> Result<BTreeMap<String, Vec<DataFile>>> {
    let mut configs: BTreeMap<String, Vec<DataFile>> = BTreeMap::new();
    if is_parquet(path) {
        configs.entry(String::new()).or_default().push(DataFile { path: path.to_path_buf(), split: SplitKind::Train });
        return Ok(configs);
    }
    if !path.is_dir() {
        return Ok(configs);
    }
    let add_dir =
        |configs: &mut BTreeMap<String, Vec<DataFile>>, dir: &Path, config: &str, split: Option<SplitKind>| {
            for p in entries(dir)? {
                if is_parquet(&p) {
                    let split = split.unwrap_or_else(|| split_of(stem(&p)));
                    configs.entry(config.to_string()).or_default().push(DataFile { path: p, split });
                }
            }
            Ok::<_, BeitError>(())
        };
    add_dir(&mut configs, path, "", None)?;
    for sub in entries(path)?.into_iter().filter(|p| p.is_dir()) {
        let name = sub.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        match split_of(&name) {
            SplitKind::Other => {
                let config = if name == "data" { String::new() } else { name };
                add_dir(&mut configs, &sub, &config, None)?;
                // `<config>/train/0000.parquet` (refs/convert/parquet): only split-named folders, so that class
                // folders of an image folder are not listed.
                for inner in entries(&sub)?.into_iter().filter(|p| p.is_dir()) {
                    let split = split_of(inner.file_name().and_then(|n| n.to_str()).unwrap_or_default());
                    if split != SplitKind::Other {
                        add_dir(&mut configs, &inner, &config, Some(split))?;
                    }
                }
            }
            split => add_dir(&mut configs, &sub, "", Some(split))?,
        }
    }
    Ok(configs)
}

/// Whether `path` holds a parquet dataset (rather than an image folder): a `.parquet` file, or a directory with
/// parquet files in one of the Hub's layouts (see the module docs).
pub fn is_parquet_dataset(path: &Path) -> bool {
    find_files(path).is_ok_and(|c| !c.is_empty())
}

/// The files of the one config of `path`, in split order; files of no known split are the training set when
/// there is no other.
fn dataset_files(path: &Path) -> Result<Vec<DataFile>> {
    let configs = find_files(path)?;
    if configs.len() > 1 {
        let names: Vec<String> =
            configs.keys().map(|k| if k.is_empty() { "data (the default)".to_string() } else { k.clone() }).collect();
        return Err(BeitError::invalid_input(
            path.display().to_string(),
            format!("holds several dataset configurations ({}); give the directory of one", names.join(", ")),
        ));
    }
    let Some(mut files) = configs.into_values().next() else {
        return Err(BeitError::invalid_input(path.display().to_string(), "no .parquet files found"));
    };
    if !files.iter().any(|f| f.split == SplitKind::Train) {
        files.iter_mut().filter(|f| f.split == SplitKind::Other).for_each(|f| f.split = SplitKind::Train);
    }
    files.retain(|f| f.split != SplitKind::Other);
    files.sort_by(|a, b| (a.split, &a.path).cmp(&(b.split, &b.path)));
    Ok(files)
}

/// An open parquet file with its columns and datasets' feature types.
struct Opened {
    reader: SerializedFileReader<File>,
    /// The `info.features` object of the `huggingface` schema metadata, when present.
    features: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Opened {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| BeitError::io(path, e))?;
        let reader = SerializedFileReader::new(file).map_err(|e| unreadable(path, e))?;
        let features = reader
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| kv.iter().find(|k| k.key == "huggingface"))
            .and_then(|k| k.value.as_deref())
            .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
            .and_then(|v| v.get("info")?.get("features")?.as_object().cloned());
        Ok(Opened { reader, features })
    }

    fn fields(&self) -> &[Arc<Type>] {
        self.reader.metadata().file_metadata().schema_descr().root_schema().get_fields()
    }

    fn column_names(&self) -> Vec<String> {
        self.fields().iter().map(|f| f.name().to_string()).collect()
    }

    fn feature_type(&self, column: &str) -> Option<&str> {
        self.features.as_ref()?.get(column)?.get("_type")?.as_str()
    }

    /// Whether `column` holds encoded images: datasets' Image feature, or a struct with a `bytes` field.
    fn is_image(&self, column: &str) -> bool {
        self.feature_type(column) == Some("Image")
            || self
                .fields()
                .iter()
                .any(|f| f.name() == column && f.is_group() && f.get_fields().iter().any(|c| c.name() == "bytes"))
    }

    fn has(&self, column: &str) -> bool {
        self.fields().iter().any(|f| f.name() == column)
    }

    /// The image column: by name, else the first Image feature. `skip` is the mask column, never the image.
    fn image_column(&self, path: &Path, skip: Option<&str>) -> Result<String> {
        let by_name = IMAGE_COLUMNS.iter().find(|c| self.has(c) && Some(**c) != skip).map(|c| c.to_string());
        by_name
            .or_else(|| self.column_names().into_iter().find(|c| self.is_image(c) && Some(c.as_str()) != skip))
            .ok_or_else(|| {
                BeitError::invalid_input(
                    path.display().to_string(),
                    format!(
                        "no image column: expected one of {IMAGE_COLUMNS:?} or an Image feature, found columns {:?}",
                        self.column_names()
                    ),
                )
            })
    }

    /// The ClassLabel names of `column` from the schema metadata.
    fn class_names(&self, column: &str) -> Option<Vec<String>> {
        let f = self.features.as_ref()?.get(column)?;
        if f.get("_type")?.as_str()? != "ClassLabel" {
            return None;
        }
        f.get("names")?.as_array()?.iter().map(|n| n.as_str().map(str::to_string)).collect()
    }

    /// Rows of `columns` only (the others, e.g. a second image column, are not decoded).
    fn rows(&self, path: &Path, columns: &[&str]) -> Result<Vec<Row>> {
        let fields: Vec<Arc<Type>> = self.fields().iter().filter(|f| columns.contains(&f.name())).cloned().collect();
        let projection =
            Type::group_type_builder("schema").with_fields(fields).build().map_err(|e| unreadable(path, e))?;
        let iter = self.reader.get_row_iter(Some(projection)).map_err(|e| unreadable(path, e))?;
        iter.map(|r| r.map_err(|e| unreadable(path, e))).collect()
    }
}

fn unreadable(path: &Path, e: parquet::errors::ParquetError) -> BeitError {
    BeitError::invalid_input(path.display().to_string(), format!("unreadable parquet: {e}"))
}

fn column<'a>(row: &'a Row, name: &str) -> Option<&'a Field> {
    row.get_column_iter().find(|(n, _)| n.as_str() == name).map(|(_, f)| f)
}

/// The encoded image of one cell: `Ok(None)` when it is null (the row is skipped), a path-only image read from
/// beside the parquet file.
fn image_cell(file: &DataFile, row: usize, col: &str, field: Option<&Field>) -> Result<Option<ImageSource>> {
    let name = file.row_name(row);
    let (bytes, rel) = match field {
        None | Some(Field::Null) => return Ok(None),
        Some(Field::Bytes(b)) => (Some(b.data().to_vec()), None),
        Some(Field::Group(g)) => {
            let bytes = match column(g, "bytes") {
                Some(Field::Bytes(b)) => Some(b.data().to_vec()),
                _ => None,
            };
            let rel = match column(g, "path") {
                Some(Field::Str(s)) => Some(s.clone()),
                _ => None,
            };
            (bytes, rel)
        }
        Some(other) => {
            return Err(BeitError::invalid_input(
                format!("{} column {col:?}", file.path.display()),
                format!("expected an image (a struct of bytes and path, or binary), found {other}"),
            ))
        }
    };
    if let Some(bytes) = bytes {
        return Ok(Some(ImageSource::Bytes { name, bytes }));
    }
    // Datasets written without embedding their files keep only the path.
    match rel {
        Some(rel) => {
            let p = file.path.parent().map_or_else(|| PathBuf::from(&rel), |d| d.join(&rel));
            if p.is_file() {
                Ok(Some(ImageSource::Path(p)))
            } else {
                Err(BeitError::invalid_input(
                    format!("{name} column {col:?}"),
                    format!("the image has no bytes and its path {rel:?} is not a file beside the parquet file"),
                ))
            }
        }
        None => Ok(None),
    }
}

fn int_cell(file: &DataFile, row: usize, col: &str, field: Option<&Field>) -> Result<Option<i64>> {
    Ok(Some(match field {
        None | Some(Field::Null) => return Ok(None),
        Some(Field::Byte(v)) => *v as i64,
        Some(Field::Short(v)) => *v as i64,
        Some(Field::Int(v)) => *v as i64,
        Some(Field::Long(v)) => *v,
        Some(Field::UByte(v)) => *v as i64,
        Some(Field::UShort(v)) => *v as i64,
        Some(Field::UInt(v)) => *v as i64,
        Some(Field::ULong(v)) => i64::try_from(*v).unwrap_or(i64::MAX),
        Some(other) => {
            return Err(BeitError::invalid_input(
                format!("{} column {col:?}", file.row_name(row)),
                format!("expected an integer class id, found {other}"),
            ))
        }
    }))
}

/// ClassLabel names of `column` from the YAML front matter of `DIR/README.md` (`dataset_info.features`, as
/// push_to_hub writes it: `- name: label` / `class_label:` / `names:` / `'0': cat`).
fn readme_names(dir: &Path, column: &str) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(dir.join("README.md")).ok()?;
    let mut lines = text.lines();
    if lines.next()?.trim() != "---" {
        return None;
    }
    let front: Vec<&str> = lines.take_while(|l| l.trim() != "---").collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let unquote = |s: &str| {
        let s = s.trim();
        if s.len() >= 2 && s.starts_with('\'') && s.ends_with('\'') {
            s[1..s.len() - 1].replace("''", "'")
        } else if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
            s[1..s.len() - 1].replace("\\\"", "\"")
        } else {
            s.to_string()
        }
    };
    let start = front.iter().position(|l| l.trim() == format!("- name: {column}"))?;
    let feature_indent = indent(front[start]);
    let block: Vec<&str> =
        front[start + 1..].iter().take_while(|l| l.trim().is_empty() || indent(l) > feature_indent).copied().collect();
    let at = block.iter().position(|l| l.trim() == "names:")?;
    let names_indent = indent(block[at]);
    let mut names = BTreeMap::new();
    for l in block[at + 1..].iter().take_while(|l| indent(l) > names_indent) {
        let (k, v) = l.trim().split_once(": ")?;
        names.insert(unquote(k).parse::<usize>().ok()?, unquote(v));
    }
    // Ids 0..n without gaps, or the names are not a ClassLabel's.
    names
        .keys()
        .enumerate()
        .all(|(i, k)| i == *k)
        .then(|| names.into_values().collect())
        .filter(|n: &Vec<_>| !n.is_empty())
}

/// Decodes on every core (the loader keeps the order); what cannot be decoded is skipped and reported.
fn decode_images(sources: Vec<ImageSource>, skipped: &mut Vec<(PathBuf, String)>) -> Vec<Option<RgbImage>> {
    load_ordered(sources, &LoaderOptions::default(), Ok)
        .map(|(name, r)| match r {
            Ok(img) => Some(img),
            Err(e) => {
                skipped.push((PathBuf::from(name), e.to_string()));
                None
            }
        })
        .collect()
}

/// A classification dataset (an image column and an integer `label` column) from `dir`: the training split, and
/// the validation split (the test split when there is none). Classes are the label's ClassLabel names from the
/// schema metadata, else from `README.md`, else "0".."n-1". Rows with a null image or label, or label -1 (how
/// datasets marks unlabeled rows), are skipped and reported.
pub fn load_classification(dir: &Path) -> Result<ImageFolder> {
    let files = dataset_files(dir)?;
    let has_val = files.iter().any(|f| f.split == SplitKind::Validation);
    let mut names: Option<Vec<String>> = None;
    let mut skipped = Vec::new();
    // (split, source, label, file, row) of every row, for the range check once the names are known.
    let mut rows: Vec<(SplitKind, ImageSource, i64, usize, usize)> = Vec::new();
    let mut label_cols = Vec::new();
    for (fi, file) in files.iter().enumerate() {
        let split = match file.split {
            SplitKind::Test if has_val => continue,
            SplitKind::Test => SplitKind::Validation,
            s => s,
        };
        let opened = Opened::open(&file.path)?;
        let image_col = opened.image_column(&file.path, None)?;
        let label_col = LABEL_COLUMNS
            .iter()
            .map(|c| c.to_string())
            .find(|c| opened.has(c))
            .or_else(|| opened.column_names().into_iter().find(|c| opened.feature_type(c) == Some("ClassLabel")))
            .ok_or_else(|| {
                BeitError::invalid_input(
                    file.path.display().to_string(),
                    format!(
                        "no label column: expected one of {LABEL_COLUMNS:?} or a ClassLabel feature, found columns {:?}",
                        opened.column_names()
                    ),
                )
            })?;
        if names.is_none() {
            names = opened.class_names(&label_col);
        }
        for (r, row) in opened.rows(&file.path, &[&image_col, &label_col])?.iter().enumerate() {
            let image = image_cell(file, r, &image_col, column(row, &image_col))?;
            let label = int_cell(file, r, &label_col, column(row, &label_col))?;
            match (image, label) {
                (Some(image), Some(label)) if label >= 0 => rows.push((split, image, label, fi, r)),
                (None, _) => skipped.push((file.row_name(r).into(), format!("column {image_col:?} is null"))),
                (_, l) => skipped.push((file.row_name(r).into(), format!("unlabeled ({label_col} {l:?})"))),
            }
        }
        label_cols.push((fi, label_col));
    }
    let names = match names.or_else(|| label_cols.first().and_then(|(_, c)| readme_names(dir, c))) {
        Some(n) => n,
        None => {
            let n = rows.iter().map(|r| r.2 + 1).max().unwrap_or(0);
            (0..n).map(|i| i.to_string()).collect()
        }
    };
    for (_, _, label, fi, r) in &rows {
        if *label as usize >= names.len() {
            let col = label_cols.iter().find(|(f, _)| f == fi).map_or("label", |(_, c)| c.as_str());
            return Err(BeitError::invalid_input(
                format!("{} column {col:?}", files[*fi].row_name(*r)),
                format!("label {label} is out of range of the {} class names {names:?}", names.len()),
            ));
        }
    }
    if names.len() < 2 {
        return Err(BeitError::invalid_input(
            dir.display().to_string(),
            format!("found {} class(es) {names:?}; classification needs at least 2", names.len()),
        ));
    }
    let mut out = ImageFolder { classes: names, train: Split::default(), val: Split::default(), skipped: Vec::new() };
    let (kinds, rest): (Vec<SplitKind>, Vec<(ImageSource, i64)>) =
        rows.into_iter().map(|(s, img, l, _, _)| (s, (img, l))).unzip();
    let (sources, labels): (Vec<ImageSource>, Vec<i64>) = rest.into_iter().unzip();
    let names_of: Vec<String> = sources.iter().map(ImageSource::name).collect();
    for (((img, label), kind), name) in
        decode_images(sources, &mut skipped).into_iter().zip(labels).zip(kinds).zip(names_of)
    {
        let Some(img) = img else { continue };
        let split = if kind == SplitKind::Train { &mut out.train } else { &mut out.val };
        split.images.push(img);
        split.labels.push(label as usize);
        split.paths.push(PathBuf::from(name));
    }
    out.skipped = skipped;
    if out.train.images.is_empty() {
        return Err(BeitError::invalid_input(dir.display().to_string(), "no readable training images"));
    }
    Ok(out)
}

/// Class names from `DIR/id2label.json` (`{"0": "wall", ...}`, as segmentation datasets on the Hub ship them).
fn id2label(dir: &Path) -> Result<Option<Vec<String>>> {
    let path = dir.join("id2label.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| BeitError::io(&path, e))?;
    let map: BTreeMap<String, String> = serde_json::from_str(&text).map_err(|e| {
        BeitError::invalid_input(path.display().to_string(), format!("expected {{\"0\": \"name\", ...}}: {e}"))
    })?;
    let mut ids = BTreeMap::new();
    for (k, v) in map {
        let id: usize = k.parse().map_err(|_| {
            BeitError::invalid_input(path.display().to_string(), format!("key {k:?} is not a class id"))
        })?;
        ids.insert(id, v);
    }
    if !ids.keys().enumerate().all(|(i, k)| i == *k) {
        return Err(BeitError::invalid_input(path.display().to_string(), "class ids are not 0..n without gaps"));
    }
    Ok(Some(ids.into_values().collect()))
}

/// A segmentation dataset (an image column and an `annotation` column of masks; `label`/`mask` when they hold
/// images) from `dir`: the training split and the validation split (the test split when there is none). Class
/// names come from `DIR/id2label.json` when present. A mask that is not one channel is an error naming its row.
pub fn load_segmentation(dir: &Path) -> Result<SegDataset> {
    let files = dataset_files(dir)?;
    let has_val = files.iter().any(|f| f.split == SplitKind::Validation);
    let mut skipped = Vec::new();
    let mut rows: Vec<(bool, ImageSource, String, Vec<u8>)> = Vec::new();
    for file in &files {
        let is_train = match file.split {
            SplitKind::Test if has_val => continue,
            s => s == SplitKind::Train,
        };
        let opened = Opened::open(&file.path)?;
        let mask_col = MASK_COLUMNS.iter().find(|c| opened.has(c) && opened.is_image(c)).ok_or_else(|| {
            BeitError::invalid_input(
                file.path.display().to_string(),
                format!(
                    "no mask column: expected one of {MASK_COLUMNS:?} holding images, found columns {:?}",
                    opened.column_names()
                ),
            )
        })?;
        let image_col = opened.image_column(&file.path, Some(mask_col))?;
        for (r, row) in opened.rows(&file.path, &[&image_col, mask_col])?.iter().enumerate() {
            let image = image_cell(file, r, &image_col, column(row, &image_col))?;
            let mask = image_cell(file, r, mask_col, column(row, mask_col))?;
            let mask = match mask {
                Some(ImageSource::Bytes { bytes, .. }) => Some(bytes),
                Some(ImageSource::Path(p)) => Some(std::fs::read(&p).map_err(|e| BeitError::io(&p, e))?),
                None => None,
            };
            match (image, mask) {
                (Some(image), Some(mask)) => rows.push((is_train, image, file.row_name(r), mask)),
                _ => skipped.push((file.row_name(r).into(), format!("column {image_col:?} or {mask_col:?} is null"))),
            }
        }
    }
    let masks: Vec<Mask> = rows
        .par_iter()
        .map(|(_, _, name, bytes)| Ok(decode_label_map(bytes, &format!("{name} mask"))?))
        .collect::<Result<_>>()?;
    let mut out = SegDataset { classes: id2label(dir)?, ..Default::default() };
    let (flags, sources_names): (Vec<bool>, Vec<(ImageSource, String)>) =
        rows.into_iter().map(|(t, s, n, _)| (t, (s, n))).unzip();
    let (sources, names): (Vec<ImageSource>, Vec<String>) = sources_names.into_iter().unzip();
    for (((img, mask), is_train), name) in
        decode_images(sources, &mut skipped).into_iter().zip(masks).zip(flags).zip(names)
    {
        let Some(img) = img else { continue };
        let split = if is_train { &mut out.train } else { &mut out.val };
        split.images.push(img);
        split.masks.push(mask);
        split.names.push(name);
    }
    out.skipped = skipped;
    if out.train.images.is_empty() {
        return Err(BeitError::invalid_input(dir.display().to_string(), "no readable training images"));
    }
    Ok(out)
}

/// Every row's image of the dataset at `path` (a dataset directory or one `.parquet` file), split after split,
/// for inference over a dataset: the sources are named `FILE row N`. Rows whose image is null come back apart,
/// as (row, reason), so that they can be reported.
pub fn image_sources(path: &Path) -> Result<(Vec<ImageSource>, Vec<(String, String)>)> {
    let files = dataset_files(path)?;
    let (mut sources, mut skipped) = (Vec::new(), Vec::new());
    for file in &files {
        let opened = Opened::open(&file.path)?;
        // A segmentation dataset's mask column is not an input image.
        let mask = MASK_COLUMNS.iter().find(|c| opened.has(c) && opened.is_image(c)).copied();
        let col = opened.image_column(&file.path, mask)?;
        for (r, row) in opened.rows(&file.path, &[&col])?.iter().enumerate() {
            match image_cell(file, r, &col, column(row, &col))? {
                Some(s) => sources.push(s),
                None => skipped.push((file.row_name(r), format!("column {col:?} is null"))),
            }
        }
    }
    Ok((sources, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/parquet");

    fn expected() -> serde_json::Value {
        let text = std::fs::read_to_string(format!("{FIXTURES}/expected.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn sum(img: &RgbImage) -> u64 {
        img.as_raw().iter().map(|&v| v as u64).sum()
    }

    fn check_split(split: &Split, want: &serde_json::Value) {
        let labels: Vec<usize> =
            want["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(split.labels, labels);
        for (i, img) in split.images.iter().enumerate() {
            let size = &want["sizes"][i];
            assert_eq!(img.dimensions(), (size[0].as_u64().unwrap() as u32, size[1].as_u64().unwrap() as u32));
            assert_eq!(sum(img), want["sums"][i].as_u64().unwrap(), "{}", split.paths[i].display());
        }
    }

    #[test]
    fn split_names() {
        assert_eq!(split_of("train-00000-of-00001"), SplitKind::Train);
        assert_eq!(split_of("validation-00003-of-00004"), SplitKind::Validation);
        assert_eq!(split_of("val"), SplitKind::Validation);
        assert_eq!(split_of("test_0"), SplitKind::Test);
        assert_eq!(split_of("trainer"), SplitKind::Other);
        assert_eq!(split_of("0000"), SplitKind::Other);
    }

    /// datasets' own files: names from the schema metadata, rows and labels in order, images as Pillow decodes.
    #[test]
    fn classification_as_written() {
        let want = expected();
        for (dir, key) in [
            (format!("{FIXTURES}/classification"), "classification"),
            (format!("{FIXTURES}/classification_readme"), "classification_readme"),
            (format!("{FIXTURES}/unnamed.parquet"), "unnamed"),
        ] {
            let dir = PathBuf::from(dir);
            assert!(is_parquet_dataset(&dir), "{key}");
            let d = load_classification(&dir).unwrap();
            let w = &want[key];
            let classes: Vec<String> = serde_json::from_value(w["classes"].clone()).unwrap();
            assert_eq!(d.classes, classes, "{key}");
            check_split(&d.train, &w["train"]);
            if w.get("validation").is_some() {
                check_split(&d.val, &w["validation"]);
            } else {
                assert!(d.val.images.is_empty());
            }
            assert!(d.skipped.is_empty(), "{:?}", d.skipped);
            assert!(d.train.paths[1].display().to_string().ends_with(".parquet row 1"), "{:?}", d.train.paths[1]);
        }
        // Through ImageFolder::load too, which splits off validation images when the data has none.
        let d = ImageFolder::load(Path::new(&format!("{FIXTURES}/unnamed.parquet")), Some(0.5), 0).unwrap();
        assert_eq!((d.train.images.len(), d.val.images.len()), (3, 3));
        let d = ImageFolder::load(Path::new(&format!("{FIXTURES}/classification")), None, 0).unwrap();
        assert_eq!((d.train.images.len(), d.val.images.len()), (12, 6));
        assert!(!is_parquet_dataset(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/digits"))));
    }

    #[test]
    fn segmentation_as_written() {
        let want = &expected()["segmentation"];
        let d = load_segmentation(Path::new(&format!("{FIXTURES}/segmentation"))).unwrap();
        let classes: Vec<String> = serde_json::from_value(want["classes"].clone()).unwrap();
        assert_eq!(d.classes, Some(classes));
        assert!(d.skipped.is_empty(), "{:?}", d.skipped);
        for (split, key) in [(&d.train, "train"), (&d.val, "validation")] {
            let rows = want[key].as_array().unwrap();
            assert_eq!(split.images.len(), rows.len());
            for (i, w) in rows.iter().enumerate() {
                let (img, mask) = (&split.images[i], &split.masks[i]);
                let size = (w["size"][0].as_u64().unwrap() as u32, w["size"][1].as_u64().unwrap() as u32);
                assert_eq!(img.dimensions(), size);
                assert_eq!(mask.dimensions(), size);
                assert_eq!(sum(img), w["image_sum"].as_u64().unwrap(), "{key} {i}");
                let msum: u64 = mask.iter().map(|&v| v as u64).sum();
                assert_eq!(msum, w["mask_sum"].as_u64().unwrap(), "{key} {i} ({})", w["kind"]);
                assert_eq!(*mask.iter().max().unwrap() as u64, w["mask_max"].as_u64().unwrap());
                let first: Vec<u16> = (0..size.0).map(|x| mask.get_pixel(x, 0)[0]).collect();
                let want_first: Vec<u16> = serde_json::from_value(w["mask_first_row"].clone()).unwrap();
                assert_eq!(first, want_first);
                assert!(split.names[i].ends_with(&format!(".parquet row {i}")));
            }
        }
        // Inference over a segmentation dataset reads its images, not its masks.
        let (sources, skipped) = image_sources(Path::new(&format!("{FIXTURES}/segmentation"))).unwrap();
        assert_eq!((sources.len(), skipped.len()), (6, 0));
    }

    /// Errors name the file, row and column, with what was expected against what was found.
    #[test]
    fn errors_name_file_and_column() {
        let err = |p: &str| load_classification(Path::new(&format!("{FIXTURES}/{p}"))).unwrap_err().to_string();
        let e = err("bad_label");
        assert!(
            e.contains("train-00000-of-00001.parquet row 1") && e.contains("\"label\"") && e.contains("label 5"),
            "{e}"
        );
        let e = err("no_image");
        assert!(e.contains("no_image/train.parquet") && e.contains("no image column") && e.contains("pixels"), "{e}");
        let e = load_segmentation(Path::new(&format!("{FIXTURES}/rgb_mask"))).unwrap_err().to_string();
        assert!(e.contains("train.parquet row 0 mask") && e.contains("Rgb"), "{e}");
        let e = load_classification(Path::new(&format!("{FIXTURES}/expected.json"))).unwrap_err().to_string();
        assert!(e.contains("no .parquet files"), "{e}");
        let dir = std::env::temp_dir().join(format!("beit-parquet-garbage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("train.parquet"), b"not parquet at all").unwrap();
        let e = load_classification(&dir).unwrap_err().to_string();
        assert!(e.contains("train.parquet") && e.contains("unreadable parquet"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn readme_yaml_names() {
        let dir = std::env::temp_dir().join(format!("beit-parquet-readme-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let yaml = "---\nlicense: mit\ndataset_info:\n  features:\n  - name: image\n    dtype: image\n  - name: label\n    dtype:\n      class_label:\n        names:\n          '0': it's\n          '1': \"b c\"\n  - name: other\n    dtype: string\n---\n# card\n";
        std::fs::write(dir.join("README.md"), yaml).unwrap();
        assert_eq!(readme_names(&dir, "label"), Some(vec!["it's".to_string(), "b c".to_string()]));
        assert_eq!(readme_names(&dir, "other"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
