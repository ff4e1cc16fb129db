//! What every training task shares: the options of the schedule and the data, the batch loop (per-step learning
//! rate, gradient accumulation and clipping, the divergence check), one record per epoch, atomic checkpoints
//! (`out/last`, `out/best`, `out/metrics.jsonl`) and --resume bit for bit. A [`Task`] brings its model, data,
//! batch loss and evaluation; [`Run`] drives it. Fine-tuning ([`FineTuning`](super::FineTuning)) and
//! pre-training ([`Pretraining`](super::pretrain::Pretraining)) are the two tasks.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::optim::{cosine_lr, AdamW};
use crate::checkpoint::{find_weight_files, load_tensors};
use crate::config::{BeitConfig, Size2};
use crate::error::{BeitError, Result};
use crate::heads::Architecture;
use crate::kernels::conv::Precision;
use crate::model::embeddings::resize_position_embeddings;
use crate::model::relative_position::resize_relative_position_table;
use crate::model::checkpoint::merge_parameter_grads;
use crate::nn::{seed_training_rng, Mode};
use crate::pretrained::save_pretrained;
use crate::processor::BeitImageProcessor;
use crate::rng::Rng;
use crate::weights::{Source, Weights};

/// The options every task has: the schedule, AdamW's weight decay, the seed, the crops and the data split.
/// Its `Default` is `beit train`'s (unilm's fine-tuning recipe for base models); tasks embed it (flattened, so
/// trainer_state.json keeps one flat `options` object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunOptions {
    /// Epochs of the schedule.
    pub epochs: usize,
    /// Images per batch.
    pub batch_size: usize,
    /// Peak learning rate, reached after the warmup.
    pub lr: f64,
    /// Learning rate at the end of the cosine.
    pub min_lr: f64,
    /// AdamW's decoupled weight decay (biases, norms, tokens and bias tables have none).
    pub weight_decay: f64,
    /// Epochs of linear warmup (a fraction counts in steps).
    pub warmup_epochs: f64,
    /// The seed of fresh weights, shuffles, augmentation, dropout and drop path.
    pub seed: u64,
    /// Stochastic depth rate of the deepest layer, set as the config's drop_path_rate (None: the config's).
    pub drop_path: Option<f64>,
    /// RandomResizedCrop's smallest area share.
    pub scale_min: f64,
    /// Random horizontal flips.
    pub hflip: bool,
    /// Input resolution: a config's, or the one a checkpoint's position tables are resized to once at load (a
    /// resumed run keeps its own).
    pub image_size: Option<usize>,
    /// Patch size of a model built from a config (a checkpoint's must equal it).
    pub patch_size: Option<usize>,
    /// Share of each class of DIR/<class>/* held out for validation (pre-training leaves it out).
    pub val_split: Option<f64>,
    /// The decay after the warmup (runs saved before it existed were cosine).
    #[serde(default)]
    pub schedule: Schedule,
    /// The Linear layers' products: f32, or bf16 with f32 accumulation and f32 master weights (torch's autocast).
    /// LayerNorm, softmax, the loss and the optimizer stay f32. Runs saved before it existed were f32.
    #[serde(default)]
    pub precision: Precision,
    /// Recompute each encoder layer's activations in the backward pass instead of keeping them (transformers'
    /// gradient checkpointing): less memory for a second forward pass, the same gradients.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

/// How the learning rate decays after the linear warmup.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine down to `min_lr` (unilm's classification and pre-training recipes).
    #[default]
    Cosine,
    /// mmseg's `poly`: `(lr - min_lr) * (1 - step / total) ^ power + min_lr` over the whole run, the warmup
    /// scaling it linearly (BEiT's ADE20K recipe: power 1, min_lr 0).
    Poly {
        /// The exponent (1: linear decay).
        power: f64,
    },
}

impl Schedule {
    /// The learning rate of optimizer step `step` in a run of `epochs` epochs of `steps_per_epoch` steps.
    pub fn lr(
        &self,
        step: usize,
        steps_per_epoch: usize,
        epochs: usize,
        warmup_epochs: f64,
        lr: f64,
        min_lr: f64,
    ) -> f64 {
        let total = steps_per_epoch * epochs;
        let warmup = (warmup_epochs * steps_per_epoch as f64).round() as usize;
        match *self {
            Schedule::Cosine => cosine_lr(step, total, warmup, lr, min_lr),
            Schedule::Poly { power } => {
                let progress = (step as f64 / total.max(1) as f64).min(1.0);
                let poly = (lr - min_lr) * (1.0 - progress).powf(power) + min_lr;
                // mmcv's linear warmup (warmup_ratio ~ 0) scales the regular learning rate.
                if step < warmup {
                    poly * step as f64 / warmup as f64
                } else {
                    poly
                }
            }
        }
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            epochs: 30,
            batch_size: 64,
            lr: 4e-3,
            min_lr: 1e-6,
            weight_decay: 0.05,
            warmup_epochs: 5.0,
            seed: 0,
            drop_path: None,
            scale_min: 0.08,
            hflip: true,
            image_size: None,
            patch_size: None,
            val_split: None,
            schedule: Schedule::Cosine,
            precision: Precision::F32,
            gradient_checkpointing: false,
        }
    }
}

impl RunOptions {
    /// How the training passes run: dropout and drop path on, nothing cached, checkpointed if asked.
    pub fn train_mode(&self) -> Mode {
        Mode { train: true, uncached: true, checkpoint: self.gradient_checkpointing }
    }

    /// Sets a config built from scratch to the asked input resolution and patch size.
    pub fn resize(&self, c: &mut BeitConfig) {
        if let Some(s) = self.image_size {
            c.image_size = Size2::square(s);
        }
        if let Some(p) = self.patch_size {
            c.patch_size = Size2::square(p);
        }
    }

    /// Fits a checkpoint read from `dir` (tensors named `beit.…`) to the asked input resolution: its position
    /// tables resized once (see [`resize_position_tables`]). A patch size other than the checkpoint's is an
    /// error: the patch embedding cannot be resized faithfully.
    pub fn fit_checkpoint(
        &self,
        config: &mut BeitConfig,
        tensors: &mut HashMap<String, Tensor>,
        dir: &Path,
    ) -> Result<()> {
        if let Some(p) = self.patch_size.filter(|&p| config.patch_size != Size2::square(p)) {
            let (h, w) = (config.patch_size.height, config.patch_size.width);
            return Err(BeitError::config(
                "patch_size",
                format!(
                    "{p} asked, but the checkpoint {} has {h}x{w} patches: its patch embedding cannot be resized \
                     (leave the patch size out, or train from a config)",
                    dir.display()
                ),
            ));
        }
        match self.image_size {
            Some(size) => resize_position_tables(config, tensors, size, dir),
            None => Ok(()),
        }
    }
}

const SHARED_BIAS_TABLE: &str = "beit.encoder.relative_position_bias.relative_position_bias_table";
const POSITION_EMBEDDINGS: &str = "beit.embeddings.position_embeddings";

fn layer_bias_table(i: usize) -> String {
    format!("beit.encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table")
}

/// Sets a checkpoint's config to `image_size` (square) and resizes its position tables to the new patch grid
/// once, with the arithmetic transformers' forward applies on every pass to inputs of that size (relative bias
/// tables, shared or per layer: bilinear; absolute position embeddings: bicubic), so that the model starts out
/// computing exactly what the checkpoint computes on such inputs. `dir` is the checkpoint, named in errors.
pub fn resize_position_tables(
    config: &mut BeitConfig,
    tensors: &mut HashMap<String, Tensor>,
    image_size: usize,
    dir: &Path,
) -> Result<()> {
    let size = Size2::square(image_size);
    if config.image_size == size {
        return Ok(());
    }
    let (ph, pw) = (config.patch_size.height, config.patch_size.width);
    if image_size < ph.max(pw) {
        return Err(BeitError::config("image_size", format!("{image_size} is smaller than one {ph}x{pw} patch")));
    }
    let from = config.patch_grid();
    let to = (image_size / ph, image_size / pw);
    let heads = config.num_attention_heads;
    let rows = (2 * from.0 - 1) * (2 * from.1 - 1) + 3;
    // The model computes in f32 (Weights converts on load), so the resize does too.
    let mut resize = |name: &str, expected: Vec<usize>, f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<()> {
        let Some(t) = tensors.get(name) else { return Ok(()) };
        if t.dims() != expected.as_slice() {
            let found = t.dims().to_vec();
            return Err(BeitError::ShapeMismatch { path: dir.to_path_buf(), name: name.to_string(), expected, found });
        }
        let resized = f(&t.to_dtype(DType::F32)?)?;
        tensors.insert(name.to_string(), resized);
        Ok(())
    };
    let bias = |t: &Tensor| resize_relative_position_table(t, from, to);
    resize(SHARED_BIAS_TABLE, vec![rows, heads], &bias)?;
    for i in 0..config.num_hidden_layers {
        resize(&layer_bias_table(i), vec![rows, heads], &bias)?;
    }
    // transformers leaves the table alone when the grid is unchanged (a size that is not a multiple of the patch).
    if from != to {
        let positions = vec![1, from.0 * from.1 + 1, config.hidden_size];
        resize(POSITION_EMBEDDINGS, positions, &|t: &Tensor| resize_position_embeddings(t, to))?;
    }
    config.image_size = size;
    Ok(())
}

/// One epoch's line of `out/metrics.jsonl`: the shared fields around the task's own (flattened in place, so
/// the line reads `epoch`, the task's fields, `lr`, `images_per_sec`, `seconds`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord<M> {
    /// The epoch (1-based).
    pub epoch: usize,
    /// The task's losses and scores.
    #[serde(flatten)]
    pub task: M,
    /// The learning rate of the epoch's last optimizer step.
    pub lr: f64,
    /// Training throughput (augmentation, forward and backward).
    pub images_per_sec: f64,
    /// Wall-clock seconds of the epoch, evaluation included.
    pub seconds: f64,
}

/// What a run reports while it runs; `M` is its per-epoch record.
pub trait TrainObserver<M> {
    /// After each batch: `done` of `total` items of `epoch` seen, and the batch's loss.
    fn batch(&mut self, _epoch: usize, _done: usize, _total: usize, _loss: f64) {}
    /// After each epoch's checkpoint: its record and every record so far.
    fn epoch(&mut self, _metrics: &M, _history: &[M]) {}
    /// Something the user should know, such as a skipped file.
    fn note(&mut self, _message: &str) {}
}

/// The metric `out/best` follows: its name (trainer_state.json keeps `best_<name>`) and which way is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Best {
    /// The metric's name.
    pub name: &'static str,
    /// Whether larger values are better (accuracy, mIoU) or smaller ones (a loss).
    pub higher_is_better: bool,
}

impl Best {
    /// Whether an epoch scoring `value` beats `best`; an epoch without the metric never does.
    pub fn improves(&self, value: Option<f64>, best: Option<f64>) -> bool {
        match (value, best) {
            (Some(v), Some(b)) if self.higher_is_better => v > b,
            (Some(v), Some(b)) => v < b,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    fn key(&self) -> String {
        format!("best_{}", self.name)
    }
}

/// What the batch loop measured over one epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochStats {
    /// Mean training loss, each batch weighted by the items its loss is a mean over.
    pub loss: f64,
    /// The learning rate of the last optimizer step.
    pub lr: f64,
    /// Training images per second.
    pub images_per_sec: f64,
}

/// A training task on the shared loop: its model and data, one epoch's training (through
/// [`RunCore::train_epoch`]) and evaluation. Semantic segmentation would be a third: mIoU as [`Task::BEST`].
pub trait Task: Sized {
    /// The task's options, with the shared ones inside (`as_mut` gives them).
    type Options: Clone + Serialize + DeserializeOwned + AsMut<RunOptions>;
    /// The task's fields of an epoch's record.
    type Metrics: Clone + Serialize + DeserializeOwned;
    /// The metric `out/best` follows.
    const BEST: Best;

    /// The value of [`Task::BEST`]'s metric in an epoch's record (None: not measured).
    fn best_value(metrics: &Self::Metrics) -> Option<f64>;

    /// Files the data loader skipped, with the reason.
    fn skipped(&self) -> &[(PathBuf, String)];

    /// Trains the next epoch (through [`RunCore::train_epoch`]) and evaluates: the task's record with the
    /// loop's measurements.
    fn epoch(&mut self, core: &mut RunCore<Self>, obs: &mut Observer<'_, Self>) -> Result<(Self::Metrics, EpochStats)>;

    /// BeitImageProcessor's `do_reduce_labels` for the saved preprocessor_config.json (None: the task has no
    /// label maps and the key is left out).
    fn reduce_labels(_opts: &Self::Options) -> Option<bool> {
        None
    }

    /// Called once the schedule's last epoch is done (also by a resumed run that finds it done).
    fn completed(&self, _core: &RunCore<Self>, _out: &Path) -> Result<()> {
        Ok(())
    }
}

/// What a run of task `T` reports to.
pub type Observer<'a, T> = dyn TrainObserver<EpochRecord<<T as Task>::Metrics>> + 'a;

/// The shared state of a run: config, weights, optimizer, options and the epochs so far.
pub struct RunCore<T: Task> {
    /// The model's config, as checkpoints save it.
    pub config: BeitConfig,
    /// The architecture checkpoints are saved as (the config's first).
    pub arch: Architecture,
    /// The trained parameters.
    pub weights: Weights,
    /// AdamW with its moments and step count.
    pub optimizer: AdamW,
    /// The run's options (when resuming, the resumed run's own).
    pub opts: T::Options,
    /// The (square) input resolution.
    pub image_size: usize,
    /// Where the tensors live.
    pub device: Device,
    history: Vec<EpochRecord<T::Metrics>>,
    start_epoch: usize,
    best: Option<f64>,
}

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// `out/last/trainer_state.json` (`H`: the history, borrowed when saving). The task's best value is stored as
/// `best_<metric>` beside `step`.
#[derive(Serialize, Deserialize)]
struct SavedState<O, H> {
    /// Last completed epoch (1-based).
    epoch: usize,
    /// Optimizer steps taken.
    step: usize,
    #[serde(flatten)]
    best: BTreeMap<String, Option<f64>>,
    options: O,
    history: H,
}

/// `out/last` when `resume` is asked and a run saved its state there: the checkpoint to continue from.
pub fn resume_dir(out: &Path, resume: bool) -> Option<PathBuf> {
    let last = out.join("last");
    (resume && last.join(STATE_FILE).is_file()).then_some(last)
}

/// The config and tensors of a checkpoint directory, on the CPU.
pub fn read_checkpoint(dir: &Path) -> Result<(BeitConfig, HashMap<String, Tensor>)> {
    let c = BeitConfig::from_file(&dir.join("config.json"))?;
    let (format, files) = find_weight_files(dir, None)?;
    Ok((c, load_tensors(format, &files, &Device::Cpu)?))
}

/// A run's saved state, as [`RunCore`] writes it into `last/`.
type RunState<T> = SavedState<<T as Task>::Options, Vec<EpochRecord<<T as Task>::Metrics>>>;

fn read_state<T: Task>(last: &Path) -> Result<RunState<T>> {
    let path = last.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| BeitError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| BeitError::Json { path: path.clone(), message: e.to_string() })
}

impl<T: Task> RunCore<T> {
    /// A run of `config`, saved as its first `architectures` entry: weights from `tensors` (fresh ones from the
    /// seed where missing), the model from them by `load`, AdamW
    /// over them with `layer_decay`; with `resume_from`, the state saved there: optimizer moments, epochs so
    /// far, and the run's own options, which win over `opts` but for the larger epoch count.
    pub fn build<Model>(
        config: BeitConfig,
        tensors: HashMap<String, Tensor>,
        out: &Path,
        mut opts: T::Options,
        layer_decay: f64,
        resume_from: Option<&Path>,
        load: impl FnOnce(&Weights, &BeitConfig) -> Result<Model>,
    ) -> Result<(Self, Model)> {
        let named = config.architectures.as_ref().and_then(|a| a.first());
        let arch = Architecture::from_name(named.map_or("", |n| n.as_str()))?;
        let device = Device::Cpu;
        // Read before the model is built: a resumed run keeps its own precision.
        let mut state = resume_from.map(read_state::<T>).transpose()?;
        let precision = match &mut state {
            Some(s) => s.options.as_mut().precision,
            None => opts.as_mut().precision,
        };
        let run = opts.as_mut();
        let source = if tensors.is_empty() { Source::Fresh } else { Source::Checkpoint };
        let weights =
            Weights::build(tensors, out.join("<init>"), source, &device, true, run.seed).with_precision(precision);
        let model = load(&weights, &config)?;
        let optimizer = AdamW::new(weights.vars(), config.num_hidden_layers, layer_decay, run.weight_decay)?;
        let image_size = config.image_size.height;
        let mut core = RunCore {
            config,
            arch,
            weights,
            optimizer,
            opts,
            image_size,
            device,
            history: Vec::new(),
            start_epoch: 0,
            best: None,
        };
        if let (Some(last), Some(state)) = (resume_from, state) {
            core.restore(last, state)?;
        }
        Ok((core, model))
    }

    fn restore(&mut self, last: &Path, mut state: RunState<T>) -> Result<()> {
        let moments = candle_core::safetensors::load(last.join(OPTIMIZER_FILE), &self.device)?;
        self.optimizer.load_state(&moments, state.step)?;
        // The run's own options win over the caller's, so the resumed run is the same run.
        let epochs = self.opts.as_mut().epochs.max(state.options.as_mut().epochs);
        self.opts = state.options;
        self.opts.as_mut().epochs = epochs;
        self.history = state.history;
        self.start_epoch = state.epoch;
        self.best = state.best.get(&T::BEST.key()).copied().flatten();
        Ok(())
    }

    /// Epochs completed (by this run and the one it resumes).
    pub fn completed_epochs(&self) -> usize {
        self.start_epoch
    }

    /// Every epoch's record so far.
    pub fn history(&self) -> &[EpochRecord<T::Metrics>] {
        &self.history
    }

    /// The next epoch (1-based: [`RunCore::completed_epochs`] + 1) over `n` training items in batches, shuffled
    /// by the seed and the epoch; `rng`, which
    /// shuffled them, goes on to the task's augmentation. `batch_loss` gives a batch's mean loss and how many
    /// items it is a mean over. The loop stops on a loss that is not finite, sums the gradients of
    /// `accum_steps` batches, clips their global norm to `clip`, steps AdamW at the scheduled learning rate and
    /// reports each batch to `obs`.
    pub fn train_epoch(
        &mut self,
        n: usize,
        accum_steps: usize,
        clip: Option<f64>,
        obs: &mut Observer<'_, T>,
        mut batch_loss: impl FnMut(&[usize], &mut Rng) -> Result<(Tensor, usize)>,
    ) -> Result<EpochStats> {
        let o = self.opts.as_mut().clone();
        let epoch = self.start_epoch + 1;
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = Rng::derive(o.seed, 2, epoch as u64);
        rng.shuffle(&mut order);
        seed_training_rng(Rng::derive(o.seed, 3, epoch as u64).next_u64());
        let accum_steps = accum_steps.max(1);
        let batches: Vec<&[usize]> = order.chunks(o.batch_size.max(1)).collect();
        let steps_per_epoch = batches.len().div_ceil(accum_steps);
        let (mut loss_sum, mut weight, mut seen, mut lr) = (0f64, 0usize, 0usize, 0f64);
        let mut grads: Vec<Option<Tensor>> = Vec::new();
        let start = Instant::now();
        for (bi, batch) in batches.iter().enumerate() {
            let (loss, count) = batch_loss(batch, &mut rng)?;
            let value = loss.to_scalar::<f32>()? as f64;
            check_loss(value, epoch, bi)?;
            let mut store = (loss / accum_steps as f64)?.backward()?;
            merge_parameter_grads(&mut store)?;
            let g = self.optimizer.grads(&store);
            grads = if grads.is_empty() { g } else { add_grads(grads, g)? };
            if (bi + 1) % accum_steps == 0 || bi + 1 == batches.len() {
                lr = o.schedule.lr(self.optimizer.step, steps_per_epoch, o.epochs, o.warmup_epochs, o.lr, o.min_lr);
                // Clipping (when asked) is folded into the step's pass over the gradients.
                self.optimizer.step(&grads, lr, clip)?;
                grads.clear();
            }
            loss_sum += value * count as f64;
            weight += count;
            seen += batch.len();
            obs.batch(epoch, seen, n, value);
        }
        let secs = start.elapsed().as_secs_f64();
        Ok(EpochStats { loss: loss_sum / weight.max(1) as f64, lr, images_per_sec: seen as f64 / secs.max(1e-9) })
    }

    /// Writes the model of `arch` with the preprocessor config of the training resolution into `dir` (in
    /// place; [`RunCore::save`] writes a whole directory atomically).
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        save_pretrained(dir, &self.config, self.arch, &self.weights.params())?;
        let json = processor_json(self.image_size, T::reduce_labels(&self.opts));
        write_file(&dir.join("preprocessor_config.json"), &json)
    }

    /// The model into `dir` as a whole, with what `extra` adds: a kill leaves the old directory or the new one.
    fn save(&self, dir: &Path, extra: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        write_dir_atomically(dir, |tmp| {
            self.save_model(tmp)?;
            extra(tmp)
        })
    }

    /// Records epoch `m`: `out/best` when it improved on the task's metric, `out/last` with the optimizer and
    /// the state (for --resume), then `out/metrics.jsonl` with every epoch, each written whole.
    fn end_epoch(&mut self, out: &Path, m: EpochRecord<T::Metrics>) -> Result<()> {
        let (epoch, value) = (m.epoch, T::best_value(&m.task));
        self.history.push(m);
        let improved = T::BEST.improves(value, self.best);
        if improved {
            self.best = value;
            self.save(&out.join("best"), |_| Ok(()))?;
        }
        let state = SavedState {
            epoch,
            step: self.optimizer.step,
            best: BTreeMap::from([(T::BEST.key(), self.best)]),
            options: &self.opts,
            history: &self.history,
        };
        let moments = self.optimizer.state()?;
        self.save(&out.join("last"), |tmp| {
            candle_core::safetensors::save(&moments, tmp.join(OPTIMIZER_FILE))?;
            let text = serde_json::to_string_pretty(&state)
                .map_err(|e| BeitError::internal("trainer state", e.to_string()))?;
            write_file(&tmp.join(STATE_FILE), &text)
        })?;
        let lines: Vec<String> = self.history.iter().filter_map(|h| serde_json::to_string(h).ok()).collect();
        let metrics = out.join("metrics.jsonl");
        let tmp = out.join(".metrics.jsonl.tmp");
        write_file(&tmp, &(lines.join("\n") + "\n"))?;
        std::fs::rename(&tmp, &metrics).map_err(|e| BeitError::io(&metrics, e))?;
        self.start_epoch = epoch;
        Ok(())
    }
}

/// A training run: the shared core and the task.
pub struct Run<T: Task> {
    /// Config, weights, optimizer, options and the epochs so far.
    pub core: RunCore<T>,
    /// The task's model and data.
    pub task: T,
}

impl<T: Task> Run<T> {
    /// Epochs completed (by this run and the one it resumes).
    pub fn completed_epochs(&self) -> usize {
        self.core.start_epoch
    }

    /// Trains up to the options' epochs, or `stop_after` more when given (for interrupted runs), writing
    /// `out/last`, `out/best` and `out/metrics.jsonl` after every epoch. Returns every epoch's record.
    pub fn run(
        &mut self,
        out: &Path,
        stop_after: Option<usize>,
        obs: &mut Observer<'_, T>,
    ) -> Result<Vec<EpochRecord<T::Metrics>>> {
        std::fs::create_dir_all(out).map_err(|e| BeitError::io(out, e))?;
        for (p, why) in self.task.skipped() {
            obs.note(&format!("skipped {}: {why}", p.display()));
        }
        let epochs = self.core.opts.as_mut().epochs;
        for epoch in self.core.start_epoch + 1..=end_epoch(self.core.start_epoch, epochs, stop_after) {
            let t = Instant::now();
            let (task, stats) = self.task.epoch(&mut self.core, obs)?;
            let seconds = t.elapsed().as_secs_f64();
            let m = EpochRecord { epoch, task, lr: stats.lr, images_per_sec: stats.images_per_sec, seconds };
            self.core.end_epoch(out, m.clone())?;
            obs.epoch(&m, &self.core.history);
        }
        if self.core.start_epoch == epochs {
            self.task.completed(&self.core, out)?;
        }
        Ok(self.core.history.clone())
    }
}

/// Sums two backward passes' gradients, parameter by parameter.
fn add_grads(a: Vec<Option<Tensor>>, b: Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
    a.into_iter()
        .zip(b)
        .map(|(a, b)| match (a, b) {
            (Some(a), Some(b)) => Ok(Some((a + b)?)),
            (a, b) => Ok(a.or(b)),
        })
        .collect()
}

/// The preprocessor_config.json a trained checkpoint ships: resize to the training resolution, then normalize.
fn processor_config(size: usize) -> serde_json::Value {
    serde_json::json!({
        "do_resize": true, "size": {"height": size, "width": size}, "resample": 3, "do_center_crop": false,
        "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "BeitImageProcessor",
    })
}

/// The processor evaluation uses during training: the one the checkpoint will ship.
pub fn eval_processor(size: usize) -> BeitImageProcessor {
    BeitImageProcessor::from_json_value(&processor_config(size), "<training>").unwrap_or_default()
    // ok: a fixed valid config
}

/// The saved preprocessor config; `reduce_labels` (a segmentation run's) makes `from_pretrained` reduce the
/// label maps as training did.
fn processor_json(size: usize, reduce_labels: Option<bool>) -> String {
    let mut config = processor_config(size);
    if let Some(reduce) = reduce_labels {
        config["do_reduce_labels"] = serde_json::Value::Bool(reduce);
    }
    serde_json::to_string_pretty(&config).unwrap_or_default() // ok: a Value always serializes
}

/// Writes `dir` as a whole: `fill` writes a temporary sibling directory, then renames, so a kill leaves either
/// the old checkpoint or the new one.
fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint");
    let parent = dir.parent().unwrap_or(Path::new("."));
    let tmp = parent.join(format!(".{name}.tmp"));
    let old = parent.join(format!(".{name}.old"));
    let _ = std::fs::remove_dir_all(&tmp);
    fill(&tmp)?;
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| BeitError::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| BeitError::io(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| BeitError::io(path, e))
}

/// The learning rate of optimizer step `step` in a run of `epochs` epochs of `steps_per_epoch` steps: linear
/// warmup over `warmup_epochs`, then cosine down to `min_lr` (unilm's per-step cosine_scheduler).
pub fn scheduled_lr(
    step: usize,
    steps_per_epoch: usize,
    epochs: usize,
    warmup_epochs: f64,
    lr: f64,
    min_lr: f64,
) -> f64 {
    Schedule::Cosine.lr(step, steps_per_epoch, epochs, warmup_epochs, lr, min_lr)
}

/// BEiT fine-tunes pre-trained checkpoints with per-layer relative bias: the shared table is copied into every
/// layer (unilm's run_class_finetuning and its segmentation backbone do the same).
pub fn unshare_relative_bias(config: &mut BeitConfig, tensors: &mut HashMap<String, Tensor>) {
    if !config.use_shared_relative_position_bias {
        return;
    }
    if let Some(table) = tensors.remove(SHARED_BIAS_TABLE) {
        for i in 0..config.num_hidden_layers {
            tensors.insert(layer_bias_table(i), table.clone());
        }
    }
    config.use_shared_relative_position_bias = false;
    config.use_relative_position_bias = true;
}

/// A diverged loss stops the run with the place it happened, instead of writing NaN weights.
fn check_loss(value: f64, epoch: usize, batch: usize) -> Result<()> {
    if value.is_finite() {
        return Ok(());
    }
    Err(BeitError::Diverged { epoch, batch, value })
}

/// The last epoch this invocation runs: all of them, or `stop_after` more (for interrupted runs).
fn end_epoch(start_epoch: usize, epochs: usize, stop_after: Option<usize>) -> usize {
    match stop_after {
        Some(k) => (start_epoch + k).min(epochs),
        None => epochs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::heads::BeitForImageClassification;
    use crate::model::ForwardOptions;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Scores {
        train_loss: f64,
        top1: Option<f64>,
    }

    #[test]
    fn a_record_reads_shared_task_shared() {
        let m = EpochRecord {
            epoch: 2,
            task: Scores { train_loss: 0.5, top1: None },
            lr: 1e-3,
            images_per_sec: 9.0,
            seconds: 1.5,
        };
        let line = serde_json::to_string(&m).unwrap();
        assert_eq!(line, r#"{"epoch":2,"train_loss":0.5,"top1":null,"lr":0.001,"images_per_sec":9.0,"seconds":1.5}"#);
        assert_eq!(serde_json::from_str::<EpochRecord<Scores>>(&line).unwrap(), m);
    }

    #[test]
    fn the_state_keeps_the_task_s_best_under_its_name() {
        let task = Scores { train_loss: 0.25, top1: Some(0.75) };
        let history = vec![EpochRecord { epoch: 1, task, lr: 0.1, images_per_sec: 1.0, seconds: 1.0 }];
        let opts = RunOptions { lr: 0.1 + 0.2, ..RunOptions::default() };
        let state = SavedState {
            epoch: 1,
            step: 7,
            best: BTreeMap::from([("best_top1".into(), Some(0.75))]),
            options: &opts,
            history: &history,
        };
        let text = serde_json::to_string(&state).unwrap();
        assert!(text.starts_with(r#"{"epoch":1,"step":7,"best_top1":0.75,"options":{"epochs":30,"#), "{text}");
        let back: SavedState<RunOptions, Vec<EpochRecord<Scores>>> = serde_json::from_str(&text).unwrap();
        assert_eq!((back.epoch, back.step, back.best["best_top1"], &back.history), (1, 7, Some(0.75), &history));
        // Options come back bit for bit.
        assert_eq!(back.options, opts);
    }

    #[test]
    fn best_follows_the_metric_s_direction() {
        let acc = Best { name: "top1", higher_is_better: true };
        let loss = Best { name: "loss", higher_is_better: false };
        assert!(
            acc.improves(Some(0.5), None) && acc.improves(Some(0.6), Some(0.5)) && !acc.improves(Some(0.5), Some(0.5))
        );
        assert!(loss.improves(Some(0.4), Some(0.5)) && !loss.improves(Some(0.6), Some(0.5)));
        // An epoch without the metric (no validation split) never becomes best.
        assert!(!acc.improves(None, None) && !acc.improves(None, Some(0.1)));
        assert_eq!(acc.key(), "best_top1");
    }

    #[test]
    fn a_non_finite_loss_is_divergence_at_its_place() {
        assert!(check_loss(2.5, 1, 0).is_ok());
        let e = check_loss(f64::NAN, 3, 4).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Diverged);
        assert!(e.to_string().contains("epoch 3, batch 4"), "{e}");
        assert!(check_loss(f64::INFINITY, 1, 0).is_err());
    }

    #[test]
    fn poly_decays_linearly_to_min_lr_after_a_scaled_warmup() {
        let poly = Schedule::Poly { power: 1.0 };
        // 10 steps per epoch, 10 epochs, 1 epoch of warmup.
        assert_eq!(poly.lr(0, 10, 10, 1.0, 1.0, 0.0), 0.0);
        assert!((poly.lr(5, 10, 10, 1.0, 1.0, 0.0) - 0.5 * 0.95).abs() < 1e-12);
        assert!((poly.lr(50, 10, 10, 1.0, 1.0, 0.0) - 0.5).abs() < 1e-12);
        assert_eq!(poly.lr(100, 10, 10, 1.0, 1.0, 0.0), 0.0);
        assert_eq!(Schedule::Cosine.lr(50, 10, 10, 1.0, 1.0, 0.0), scheduled_lr(50, 10, 10, 1.0, 1.0, 0.0));
        // Saved options without a schedule read as cosine; poly round-trips.
        let o: RunOptions = serde_json::from_value(serde_json::json!({"epochs": 1, "batch_size": 1, "lr": 1.0,
            "min_lr": 0.0, "weight_decay": 0.0, "warmup_epochs": 0.0, "seed": 0, "drop_path": null, "scale_min": 0.1,
            "hflip": true, "image_size": null, "patch_size": null, "val_split": null}))
        .unwrap();
        assert_eq!(o.schedule, Schedule::Cosine);
        let text = serde_json::to_string(&poly).unwrap();
        assert_eq!(serde_json::from_str::<Schedule>(&text).unwrap(), poly);
    }

    #[test]
    fn stop_after_ends_early_but_not_past_the_schedule() {
        assert_eq!(end_epoch(0, 5, None), 5);
        assert_eq!(end_epoch(2, 5, Some(2)), 4);
        assert_eq!(end_epoch(4, 5, Some(2)), 5);
    }

    /// A tiny classifier's tensors with random values everywhere (fresh position tables would be zeros).
    fn random_checkpoint(c: &BeitConfig, seed: u64) -> HashMap<String, Tensor> {
        let w = Weights::fresh(&Device::Cpu, seed);
        BeitForImageClassification::load(&w, c).unwrap();
        let mut rng = Rng::new(seed);
        w.params()
            .into_iter()
            .map(|(name, t)| {
                let v: Vec<f32> = (0..t.elem_count()).map(|_| (rng.normal() * 0.5) as f32).collect();
                (name, Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap())
            })
            .collect()
    }

    /// The logits and every hidden state of `tensors` as a classifier of `c` on `x`.
    fn outputs(c: &BeitConfig, tensors: HashMap<String, Tensor>, x: &Tensor) -> Vec<Tensor> {
        let w = Weights::new(tensors, "<test>", &Device::Cpu);
        let model = BeitForImageClassification::load(&w, c).unwrap();
        assert!(w.report().newly_initialized.is_empty(), "{:?}", w.report());
        let o = ForwardOptions { output_hidden_states: true, ..Default::default() };
        let out = model.forward(x, &o, None).unwrap();
        let mut v = vec![out.logits];
        v.extend(out.base.hidden_states.unwrap());
        v
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn a_checkpoint_resized_at_load_computes_what_on_the_fly_interpolation_does() {
        let tiny = BeitConfig {
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            image_size: Size2::square(16),
            patch_size: Size2::square(4),
            id2label: crate::config::default_labels(3),
            ..BeitConfig::default()
        };
        let per_layer = BeitConfig { use_relative_position_bias: true, ..tiny.clone() };
        let shared = BeitConfig { use_shared_relative_position_bias: true, ..tiny.clone() };
        let absolute = BeitConfig { use_absolute_position_embeddings: true, ..tiny.clone() };
        // Up (4x4 -> 6x6 patches, as 224 -> 640 is 14 -> 40) and down (4x4 -> 3x3).
        for (name, c, size) in
            [("per-layer", &per_layer, 24), ("shared", &shared, 24), ("absolute", &absolute, 24), ("down", &shared, 12)]
        {
            let tensors = random_checkpoint(c, 3);
            let v: Vec<f32> = (0..2 * 3 * size * size).map(|i| ((i * 7919) % 997) as f32 / 498.5 - 1.0).collect();
            let x = Tensor::from_vec(v, (2, 3, size, size), &Device::Cpu).unwrap();
            // The checkpoint as it is: transformers' forward interpolates its tables to the input's grid.
            let want = outputs(c, tensors.clone(), &x);
            let (mut rc, mut rt) = (c.clone(), tensors);
            resize_position_tables(&mut rc, &mut rt, size, Path::new("<test>")).unwrap();
            assert_eq!(rc.image_size, Size2::square(size));
            let grid = size / 4;
            let rows = (2 * grid - 1) * (2 * grid - 1) + 3;
            for (k, t) in &rt {
                if k.ends_with("relative_position_bias_table") {
                    assert_eq!(t.dims(), [rows, 2], "{name}: {k}");
                } else if k.ends_with("position_embeddings") {
                    assert_eq!(t.dims(), [1, grid * grid + 1, 16], "{name}: {k}");
                }
            }
            let got = outputs(&rc, rt.clone(), &x);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                let d = max_abs_diff(a, b);
                assert!(d <= 1e-5, "{name}: output {i} differs by {d}");
            }
            // Resizing the shared table then copying it into every layer (as fine-tuning does) changes nothing.
            if rc.use_shared_relative_position_bias {
                unshare_relative_bias(&mut rc, &mut rt);
                for (a, b) in outputs(&rc, rt, &x).iter().zip(&want) {
                    assert!(max_abs_diff(a, b) <= 1e-5, "{name}: unshared");
                }
            }
        }
    }

    #[test]
    fn a_checkpoint_keeps_its_patch_size_and_a_same_size_is_left_alone() {
        let c = BeitConfig {
            hidden_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            intermediate_size: 32,
            image_size: Size2::square(16),
            patch_size: Size2::square(4),
            use_relative_position_bias: true,
            ..BeitConfig::default()
        };
        let tensors = random_checkpoint(&c, 1);
        let opts = RunOptions { image_size: Some(32), patch_size: Some(8), ..RunOptions::default() };
        let (mut rc, mut rt) = (c.clone(), tensors.clone());
        let e = opts.fit_checkpoint(&mut rc, &mut rt, Path::new("ckpt")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("patch_size") && e.to_string().contains("4x4"), "{e}");
        assert_eq!(rc.image_size, c.image_size, "nothing changes on error");
        // Its own patch size is fine; its own image size changes nothing.
        let same = RunOptions { image_size: Some(16), patch_size: Some(4), ..RunOptions::default() };
        same.fit_checkpoint(&mut rc, &mut rt, Path::new("ckpt")).unwrap();
        let key = layer_bias_table(0);
        assert_eq!(max_abs_diff(&rt[&key], &tensors[&key]), 0.0);
        // A table of another shape than the config's grid is named.
        rt.insert(key.clone(), Tensor::zeros((5, 2), DType::F32, &Device::Cpu).unwrap());
        let e = resize_position_tables(&mut rc, &mut rt, 32, Path::new("ckpt")).unwrap_err();
        assert!(e.to_string().contains(&key) && e.to_string().contains("[5, 2]"), "{e}");
    }

    #[test]
    fn only_a_task_with_label_maps_writes_do_reduce_labels() {
        let v = |r| serde_json::from_str::<serde_json::Value>(&processor_json(16, r)).unwrap();
        assert!(v(None).get("do_reduce_labels").is_none());
        assert_eq!(v(Some(true))["do_reduce_labels"], true);
        assert_eq!(v(Some(false))["do_reduce_labels"], false);
        let p = BeitImageProcessor::from_json_value(&v(Some(true)), "<test>").unwrap();
        assert!(p.do_reduce_labels);
    }

    #[test]
    fn accumulated_gradients_add_where_both_have_one() {
        let d = Device::Cpu;
        let t = |v: f32| Some(Tensor::new(&[v], &d).unwrap());
        let sum = add_grads(vec![t(1.0), None, t(2.0), None], vec![t(0.5), t(3.0), None, None]).unwrap();
        let values: Vec<Option<f32>> = sum.iter().map(|g| g.as_ref().map(|g| g.to_vec1::<f32>().unwrap()[0])).collect();
        assert_eq!(values, vec![Some(1.5), Some(3.0), Some(2.0), None]);
    }
}
