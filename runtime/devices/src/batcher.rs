//! Joining concurrent compute calls into one run along the batch axis.
//!
//! One worker task per batchable model collects calls: the first call opens
//! a window of [`BatchConfig::window`]; calls arriving before it closes (or
//! until [`BatchConfig::max_rows`] rows) join. The joined inputs run once on
//! a blocking thread, and each caller gets its own rows of every output.
//! While a batch runs, new calls queue and form the next batch, so under load
//! batches grow by themselves. Nothing blocks a runtime thread while waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tract_onnx::prelude::*;

use crate::{DeviceError, PreparedModel, Result};

/// Default time the first call of a batch waits for others.
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(2);
/// Default largest batch, in rows.
pub const DEFAULT_MAX_BATCH_ROWS: usize = 64;

/// How long to wait for a batch to fill, and how large it may grow.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Window opened by the first call of a batch.
    pub window: Duration,
    /// Flush early at this many rows; `1` turns batching off.
    pub max_rows: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            window: DEFAULT_BATCH_WINDOW,
            max_rows: DEFAULT_MAX_BATCH_ROWS,
        }
    }
}

/// The outputs of one call, and how many calls shared its run.
#[derive(Debug)]
pub struct Batched {
    /// This call's outputs, in model order.
    pub outputs: Vec<Tensor>,
    /// Calls joined into the run (1 when not batched).
    pub calls: usize,
    /// This call's share (by rows) of the time the device was busy with the
    /// run (see [`PreparedModel::run_timed`]): what the call is billed for.
    pub compute: Duration,
    /// Whether the run happened on the caller's own thread, inside its poll
    /// (a short run of a model that is not batched): its time is then also in
    /// the caller's CPU time, and must not be billed twice.
    pub on_caller: bool,
}

struct Job {
    inputs: Vec<Tensor>,
    rows: usize,
    reply: oneshot::Sender<Result<Batched>>,
}

/// The batcher of one prepared model.
#[derive(Debug, Clone)]
pub struct Batcher {
    model: Arc<PreparedModel>,
    queue: Option<mpsc::UnboundedSender<Job>>,
    stats: Arc<BatchStats>,
}

/// Counters of runs and the calls they served.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Model runs.
    pub runs: AtomicU64,
    /// Calls served by those runs.
    pub calls: AtomicU64,
    /// Recent run time in nanoseconds (moving average; 0 before the first).
    pub mean_run_ns: AtomicU64,
    /// Busy time of all runs, in nanoseconds, as [`PreparedModel::run_timed`]
    /// measures it: the sum of what the runs' calls are billed.
    pub busy_ns: AtomicU64,
}

/// Runs shorter than this (on average) run on the calling thread: a hop to
/// the blocking pool costs tens of microseconds, more than a small model's
/// whole run. Longer ones go to the blocking pool so no runtime thread
/// stalls.
const INLINE_RUN_BELOW: Duration = Duration::from_micros(100);

/// Runs `f` (a model run, returning its busy time) inline when runs of this
/// model are known to be short and this one needs no planning (`planned`),
/// else on the blocking pool; records its time. Says whether it ran inline.
async fn run_on_device<T: Send + 'static>(
    stats: &BatchStats,
    planned: bool,
    f: impl FnOnce() -> Result<(T, Duration)> + Send + 'static,
) -> Result<(T, Duration, bool)> {
    let mean = stats.mean_run_ns.load(Ordering::Relaxed);
    let started = std::time::Instant::now();
    let inline = planned && mean != 0 && mean < INLINE_RUN_BELOW.as_nanos() as u64;
    let result = if inline {
        f()
    } else {
        tokio::task::spawn_blocking(f)
            .await
            .unwrap_or(Err(DeviceError::Unavailable))
    };
    let took = started.elapsed().as_nanos() as u64;
    let updated = if mean == 0 { took } else { (mean * 7 + took) / 8 };
    stats.mean_run_ns.store(updated.max(1), Ordering::Relaxed);
    let (value, busy) = result?;
    stats.runs.fetch_add(1, Ordering::Relaxed);
    stats.busy_ns.fetch_add(nanos(busy), Ordering::Relaxed);
    Ok((value, busy, inline))
}

fn nanos(time: Duration) -> u64 {
    u64::try_from(time.as_nanos()).unwrap_or(u64::MAX)
}

impl Batcher {
    /// A batcher for `model`; batchable models get a worker task (needs a
    /// tokio runtime), others run each call on its own.
    pub fn new(model: Arc<PreparedModel>, config: BatchConfig) -> Batcher {
        let stats = Arc::new(BatchStats::default());
        let queue = (model.batchable() && config.max_rows > 1).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(worker(model.clone(), rx, config, stats.clone()));
            tx
        });
        Batcher { model, queue, stats }
    }

    /// Runs `inputs` (validated against the model), possibly joined with
    /// concurrent calls.
    pub async fn run(&self, inputs: Vec<Tensor>) -> Result<Batched> {
        let Some(queue) = &self.queue else {
            let model = self.model.clone();
            let planned = model.is_planned(&inputs);
            let (outputs, compute, on_caller) =
                run_on_device(&self.stats, planned, move || model.run_timed(inputs)).await?;
            self.stats.calls.fetch_add(1, Ordering::Relaxed);
            return Ok(Batched {
                outputs,
                calls: 1,
                compute,
                on_caller,
            });
        };
        let rows = inputs.first().and_then(|t| t.shape().first().copied()).unwrap_or(1);
        let (reply, answer) = oneshot::channel();
        queue
            .send(Job { inputs, rows, reply })
            .map_err(|_| DeviceError::Unavailable)?;
        answer.await.map_err(|_| DeviceError::Unavailable)?
    }

    /// Runs and calls so far.
    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }

    /// Time the device spent on this model's runs, in nanoseconds (see
    /// [`PreparedModel::run_timed`]).
    pub fn busy_ns(&self) -> u64 {
        self.stats.busy_ns.load(Ordering::Relaxed)
    }
}

async fn worker(
    model: Arc<PreparedModel>,
    mut queue: mpsc::UnboundedReceiver<Job>,
    config: BatchConfig,
    stats: Arc<BatchStats>,
) {
    while let Some(first) = queue.recv().await {
        let mut rows = first.rows;
        let mut jobs = vec![first];
        // Calls already waiting join at once; then, with a window, later ones
        // until it closes. (A zero window must not reach the timer: its
        // millisecond granularity would make "no wait" a 1 ms wait.)
        while rows < config.max_rows {
            match queue.try_recv() {
                Ok(job) => {
                    rows += job.rows;
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let deadline = tokio::time::Instant::now() + config.window;
        while rows < config.max_rows && !config.window.is_zero() {
            match tokio::time::timeout_at(deadline, queue.recv()).await {
                Ok(Some(job)) => {
                    rows += job.rows;
                    jobs.push(job);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let model = model.clone();
        let inputs: Vec<Vec<Tensor>> = jobs.iter_mut().map(|j| std::mem::take(&mut j.inputs)).collect();
        let row_counts: Vec<usize> = jobs.iter().map(|j| j.rows).collect();
        // Batchable models have one plan for every batch size.
        let result = run_on_device(&stats, true, move || run_joined(&model, inputs, &row_counts)).await;
        stats.calls.fetch_add(jobs.len() as u64, Ordering::Relaxed);
        let calls = jobs.len();
        match result {
            // Inline here is on the batcher's task, never a caller's.
            Ok((per_job, busy, _inline)) => {
                let rows: Vec<usize> = jobs.iter().map(|j| j.rows).collect();
                for ((job, outputs), compute) in jobs.into_iter().zip(per_job).zip(shares(busy, &rows)) {
                    let _ = job.reply.send(Ok(Batched {
                        outputs,
                        calls,
                        compute,
                        on_caller: false,
                    }));
                }
            }
            Err(err) => {
                for job in jobs {
                    let _ = job.reply.send(Err(err.clone()));
                }
            }
        }
    }
}

/// A run's busy time shared among its calls by rows, to the nanosecond: the
/// shares add up to `busy` exactly (the remainder of the division goes to
/// the first calls), so billed compute sums to the device's busy time.
fn shares(busy: Duration, rows: &[usize]) -> Vec<Duration> {
    let total = nanos(busy);
    let all_rows = rows.iter().map(|&r| r as u128).sum::<u128>().max(1);
    let mut shares: Vec<u64> = rows
        .iter()
        .map(|&r| (u128::from(total) * r as u128 / all_rows) as u64)
        .collect();
    let mut left = total - shares.iter().sum::<u64>();
    for share in shares.iter_mut() {
        if left == 0 {
            break;
        }
        *share += 1;
        left -= 1;
    }
    shares.into_iter().map(Duration::from_nanos).collect()
}

/// Per-call outputs of a joined run, and the device's time for the run.
type JoinedOutputs = (Vec<Vec<Tensor>>, Duration);

/// Concatenates each input along axis 0, runs once, and splits every output
/// back into the callers' row ranges.
fn run_joined(model: &PreparedModel, inputs: Vec<Vec<Tensor>>, rows: &[usize]) -> Result<JoinedOutputs> {
    if inputs.len() == 1 {
        let single = inputs.into_iter().next().unwrap_or_default();
        let (outputs, time) = model.run_timed(single)?;
        return Ok((vec![outputs], time));
    }
    let arity = model.inputs().len();
    let mut joined = Vec::with_capacity(arity);
    for ix in 0..arity {
        let parts: Vec<&Tensor> = inputs.iter().filter_map(|call| call.get(ix)).collect();
        let tensor =
            Tensor::stack_tensors(0, &parts).map_err(|e| DeviceError::Runtime(format!("joining a batch: {e}")))?;
        joined.push(tensor);
    }
    let (outputs, time) = model.run_timed(joined)?;
    let mut per_call: Vec<Vec<Tensor>> = rows.iter().map(|_| Vec::with_capacity(outputs.len())).collect();
    for output in &outputs {
        let mut start = 0;
        for (call, &n) in rows.iter().enumerate() {
            let part = output
                .slice(0, start, start + n)
                .map_err(|e| DeviceError::Runtime(format!("splitting a batch: {e}")))?;
            per_call[call].push(part);
            start += n;
        }
    }
    Ok((per_call, time))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_plain_array_view::<f32>().expect("f32").iter().copied().collect()
    }
    use crate::{CpuDevice, Device as _};
    use hearth_fixtures::models::{MLP_INPUTS, mlp, mlp_input};

    fn input(n: u64) -> Vec<Tensor> {
        vec![Tensor::from_shape(&[1, MLP_INPUTS], &mlp_input(n)).expect("tensor")]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_join_one_run_and_get_their_own_rows() {
        let model = Arc::new(CpuDevice::new().prepare(&mlp(1)).expect("prepare"));
        // A window far longer than the test: the batch closes when all 32
        // rows have arrived, so exactly one run serves every call.
        let config = BatchConfig {
            window: Duration::from_secs(600),
            max_rows: 32,
        };
        let batcher = Batcher::new(model.clone(), config);
        let calls = (0..32u64).map(|n| {
            let batcher = batcher.clone();
            tokio::spawn(async move { (n, batcher.run(input(n)).await.expect("run")) })
        });
        let calls: Vec<_> = calls.collect();
        let mut billed = Vec::new();
        for call in calls {
            let (n, batched) = call.await.expect("join");
            assert_eq!(batched.calls, 32);
            assert!(!batched.on_caller, "a batch runs on the batcher's task");
            billed.push(batched.compute);
            let expected = model.run(input(n)).expect("direct");
            assert_eq!(batched.outputs[0].shape(), expected[0].shape());
            let (got, want) = (values(&batched.outputs[0]), values(&expected[0]));
            for (a, b) in got.iter().zip(want) {
                assert!((a - b).abs() < 1e-5, "call {n}: {a} vs {b}");
            }
        }
        assert_eq!(batcher.stats().runs.load(Ordering::Relaxed), 1);
        assert_eq!(batcher.stats().calls.load(Ordering::Relaxed), 32);
        assert_eq!(
            billed.iter().sum::<Duration>(),
            Duration::from_nanos(batcher.busy_ns()),
            "the calls' shares add up to the run's busy time"
        );
        assert!(billed.iter().all(|share| !share.is_zero()), "{billed:?}");
    }

    #[test]
    fn shares_follow_rows_and_add_up_exactly() {
        let shares = shares(Duration::from_nanos(10), &[1, 1, 1]);
        assert_eq!(shares.iter().map(Duration::as_nanos).collect::<Vec<_>>(), vec![4, 3, 3]);
        let shares = super::shares(Duration::from_nanos(1_000), &[3, 1]);
        assert_eq!(
            shares.iter().map(Duration::as_nanos).collect::<Vec<_>>(),
            vec![750, 250]
        );
    }

    #[tokio::test]
    async fn batching_off_runs_each_call_alone() {
        let model = Arc::new(CpuDevice::new().prepare(&mlp(1)).expect("prepare"));
        let batcher = Batcher::new(
            model,
            BatchConfig {
                window: Duration::ZERO,
                max_rows: 1,
            },
        );
        let batched = batcher.run(input(0)).await.expect("run");
        assert_eq!(batched.calls, 1);
        assert_eq!(batcher.stats().runs.load(Ordering::Relaxed), 1);
    }
}
