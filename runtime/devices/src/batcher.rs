//! Joining concurrent compute calls into one run along the batch axis.
//!
//! One worker task per batchable model collects calls. Calls join one run
//! only when their inputs match on every axis but the batch axis (a guest
//! that pads token sequences to a few lengths, as the guest SDK's
//! `pad_tokens` does, makes that common). Each call brings its
//! [`CallTerms`]: how long it may wait for company and the largest run it
//! joins (a model's `max_delay_ms`, else the server's window; its
//! `max_batch`, capped by the server's [`BatchConfig`]), and how urgent it
//! is. By default a call waits for no one: while its device has a free lane
//! it runs at once, and batches form from the calls that queue while every
//! lane is busy (as Triton's dynamic batcher does with no queue delay).
//! Waiting for company on an idle device only adds latency, unless the
//! model asks for it: fewer, fuller runs make each call's share of the
//! compute smaller. A group of calls runs when it has the rows its
//! first call allows or when the earliest deadline among them passes; rows
//! of more urgent calls are taken first, except that a call past its
//! deadline is taken before anything else, so no class waits past its bound
//! for a batch to form. The joined inputs run once on a blocking thread, and
//! each caller gets its own rows of every output. A model runs as many
//! batches at once as its device has parallel lanes (a CPU core each: tract
//! runs one model run on one thread; one on a GPU); while they are all busy,
//! new calls queue and form the next batch, so under load batches grow by
//! themselves. Nothing blocks a runtime thread while waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tract_onnx::prelude::*;

use crate::{DeviceError, PreparedModel, Result};

/// Default time the first call of a batch waits for others: none. A lone
/// call on an idle device runs at once (with a 2 ms window, every call of a
/// 20 µs model took over 2 ms and `classify` ran at a sixth of its
/// unbatched throughput); under load, calls queue behind busy lanes and
/// batch anyway.
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::ZERO;
/// Default largest batch, in rows.
pub const DEFAULT_MAX_BATCH_ROWS: usize = 64;

/// The server's batching defaults: how long a call waits for a batch to
/// fill when its model does not say, and how large a batch may grow. A
/// model's own settings ([`CallTerms`]) may ask for fewer rows, never more,
/// and for a wait of their own: it delays only that model's calls.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Longest a call waits for others when its model does not say.
    pub window: Duration,
    /// Largest batch, in rows; `1` turns batching off everywhere.
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

/// What one call asks of the batcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallTerms {
    /// Higher is more urgent: when a batch forms, rows of more urgent calls
    /// are taken first (Hearth's QoS classes: batch 0, standard 1,
    /// realtime 2).
    pub urgency: u8,
    /// Largest run this call joins, in rows (`None`: the server's cap).
    pub max_rows: Option<usize>,
    /// Longest this call waits for company (`None`: the server's window;
    /// either way, a batch that fills runs at once).
    pub max_delay: Option<Duration>,
}

impl Default for CallTerms {
    fn default() -> Self {
        CallTerms {
            urgency: 1,
            max_rows: None,
            max_delay: None,
        }
    }
}

impl CallTerms {
    /// These terms with the server's defaults and cap: (largest run, longest
    /// wait). The wait is the model's own choice (latency for a smaller
    /// share of compute) and delays no one else's calls, so it is not
    /// capped; rows are, since a run's size is the device's.
    fn capped(self, config: &BatchConfig) -> (usize, Duration) {
        let rows = self.max_rows.map_or(config.max_rows, |rows| rows.min(config.max_rows));
        let delay = self.max_delay.unwrap_or(config.window);
        (rows.max(1), delay)
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
    /// Time the call waited before its run started (for a batch to form,
    /// or for the run before it).
    pub queued: Duration,
    /// Whether this call was the first of its run: counting these counts
    /// every run once.
    pub leads: bool,
    /// Whether the run happened on the caller's own thread, inside its poll
    /// (a short run of a model that is not batched): its time is then also in
    /// the caller's CPU time, and must not be billed twice.
    pub on_caller: bool,
}

struct Job {
    inputs: Vec<Tensor>,
    rows: usize,
    /// Every input's dimensions but the first: calls join only when equal.
    shape: Vec<Vec<usize>>,
    urgency: u8,
    max_rows: usize,
    arrived: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<Batched>>,
}

impl Job {
    /// Order in which jobs are taken: past their deadline first (earliest
    /// deadline first), then the more urgent, then the earlier deadline.
    fn order(&self, now: Instant) -> (bool, std::cmp::Reverse<u8>, Instant) {
        let overdue = self.deadline <= now;
        if overdue {
            (false, std::cmp::Reverse(u8::MAX), self.deadline)
        } else {
            (true, std::cmp::Reverse(self.urgency), self.deadline)
        }
    }
}

/// The batcher of one prepared model.
#[derive(Debug, Clone)]
pub struct Batcher {
    model: Arc<PreparedModel>,
    config: BatchConfig,
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
    /// Rows served by those runs (the batch axis summed).
    pub rows: AtomicU64,
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

fn rows_of(inputs: &[Tensor]) -> usize {
    inputs.first().and_then(|t| t.shape().first().copied()).unwrap_or(1)
}

impl Batcher {
    /// A batcher for `model` running up to `lanes` batches at once;
    /// batchable models get a worker task (needs a tokio runtime), others
    /// run each call on its own.
    pub fn new(model: Arc<PreparedModel>, config: BatchConfig, lanes: usize) -> Batcher {
        let stats = Arc::new(BatchStats::default());
        let queue = (model.batchable() && config.max_rows > 1).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(worker(model.clone(), rx, stats.clone(), lanes.max(1)));
            tx
        });
        Batcher {
            model,
            config,
            queue,
            stats,
        }
    }

    /// Runs `inputs` (validated against the model) on the terms of the
    /// call, possibly joined with concurrent calls of the same shape.
    pub async fn run(&self, inputs: Vec<Tensor>, terms: CallTerms) -> Result<Batched> {
        let (max_rows, max_delay) = terms.capped(&self.config);
        let queue = self.queue.as_ref().filter(|_| max_rows > 1);
        let Some(queue) = queue else {
            let model = self.model.clone();
            let planned = model.is_planned(&inputs);
            let rows = rows_of(&inputs);
            let (outputs, compute, on_caller) =
                run_on_device(&self.stats, planned, move || model.run_timed(inputs)).await?;
            self.stats.calls.fetch_add(1, Ordering::Relaxed);
            self.stats.rows.fetch_add(rows as u64, Ordering::Relaxed);
            return Ok(Batched {
                outputs,
                calls: 1,
                compute,
                queued: Duration::ZERO,
                leads: true,
                on_caller,
            });
        };
        let rows = rows_of(&inputs);
        let shape = inputs
            .iter()
            .map(|t| t.shape().get(1..).unwrap_or_default().to_vec())
            .collect();
        let arrived = Instant::now();
        let (reply, answer) = oneshot::channel();
        let job = Job {
            inputs,
            rows,
            shape,
            urgency: terms.urgency,
            max_rows,
            arrived,
            deadline: arrived + max_delay,
            reply,
        };
        queue.send(job).map_err(|_| DeviceError::Unavailable)?;
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
    stats: Arc<BatchStats>,
    lanes: usize,
) {
    let lanes = Arc::new(tokio::sync::Semaphore::new(lanes));
    let mut pending: Vec<Job> = Vec::new();
    let mut closed = false;
    loop {
        if pending.is_empty() {
            if closed {
                return;
            }
            match queue.recv().await {
                Some(job) => pending.push(job),
                None => return,
            }
        }
        // A lane first: while every lane runs, calls keep queueing and the
        // next batch is formed from all of them.
        let Ok(lane) = lanes.clone().acquire_owned().await else {
            return;
        };
        let jobs = loop {
            while let Ok(job) = queue.try_recv() {
                pending.push(job);
            }
            let now = Instant::now();
            let (shape, cap) = match pending.iter().min_by_key(|job| job.order(now)) {
                Some(head) => (head.shape.clone(), head.max_rows),
                None => break Vec::new(),
            };
            let group = pending.iter().filter(|job| job.shape == shape);
            let rows: usize = group.clone().map(|job| job.rows).sum();
            let due = group.map(|job| job.deadline).min().unwrap_or(now);
            if closed || rows >= cap || due <= now {
                break take(&mut pending, &shape, cap, now);
            }
            // Wake for the first deadline of any pending call, not only of
            // the head's group: a less urgent call of another shape that
            // falls due goes first then.
            let wake = pending.iter().map(|job| job.deadline).min().unwrap_or(due);
            match tokio::time::timeout_at(wake.min(due), queue.recv()).await {
                Ok(Some(job)) => pending.push(job),
                Ok(None) => closed = true,
                Err(_) => {}
            }
        };
        if jobs.is_empty() {
            continue;
        }
        let (model, stats) = (model.clone(), stats.clone());
        tokio::spawn(async move {
            run_batch(&model, &stats, jobs).await;
            drop(lane);
        });
    }
}

/// Takes the calls of `shape` in [`Job::order`] while they fit in `cap`
/// rows (the first always), leaving the rest pending.
fn take(pending: &mut Vec<Job>, shape: &[Vec<usize>], cap: usize, now: Instant) -> Vec<Job> {
    let mut candidates: Vec<usize> = (0..pending.len()).filter(|&i| pending[i].shape == shape).collect();
    candidates.sort_by_key(|&i| pending[i].order(now));
    let mut rows = 0;
    let mut chosen = Vec::new();
    for i in candidates {
        if chosen.is_empty() || rows + pending[i].rows <= cap {
            rows += pending[i].rows;
            chosen.push(i);
        }
    }
    let mut slots: Vec<Option<Job>> = pending.drain(..).map(Some).collect();
    let taken = chosen.iter().filter_map(|&i| slots[i].take()).collect();
    pending.extend(slots.into_iter().flatten());
    taken
}

async fn run_batch(model: &Arc<PreparedModel>, stats: &BatchStats, mut jobs: Vec<Job>) {
    let started = Instant::now();
    let model = model.clone();
    let inputs: Vec<Vec<Tensor>> = jobs.iter_mut().map(|j| std::mem::take(&mut j.inputs)).collect();
    let rows: Vec<usize> = jobs.iter().map(|j| j.rows).collect();
    let row_counts = rows.clone();
    // Batchable models have one plan for every batch size.
    let result = run_on_device(stats, true, move || run_joined(&model, inputs, &row_counts)).await;
    stats.calls.fetch_add(jobs.len() as u64, Ordering::Relaxed);
    stats
        .rows
        .fetch_add(rows.iter().sum::<usize>() as u64, Ordering::Relaxed);
    let calls = jobs.len();
    match result {
        // Inline here is on the batcher's task, never a caller's.
        Ok((per_job, busy, _inline)) => {
            let runs = jobs.into_iter().zip(per_job).zip(shares(busy, &rows));
            for (i, ((job, outputs), compute)) in runs.enumerate() {
                let _ = job.reply.send(Ok(Batched {
                    outputs,
                    calls,
                    compute,
                    queued: started.saturating_duration_since(job.arrived),
                    leads: i == 0,
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
        let batcher = Batcher::new(model.clone(), config, 1);
        let calls = (0..32u64).map(|n| {
            let batcher = batcher.clone();
            tokio::spawn(async move { (n, batcher.run(input(n), CallTerms::default()).await.expect("run")) })
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_join_only_calls_of_their_own_shape() {
        let model = Arc::new(
            CpuDevice::new()
                .prepare(&hearth_fixtures::models::row_sums())
                .expect("prepare"),
        );
        assert!(model.batchable(), "a free sequence axis still batches");
        // Two lengths, two calls each; a run closes at 2 rows, so each
        // length forms one run of its own calls however they interleave.
        let batcher = Batcher::new(
            model,
            BatchConfig {
                window: Duration::from_secs(600),
                max_rows: 64,
            },
            2,
        );
        let terms = CallTerms {
            max_rows: Some(2),
            ..CallTerms::default()
        };
        let calls = [(3usize, 1.0f32), (5, 2.0), (3, 3.0), (5, 4.0)].map(|(length, value)| {
            let batcher = batcher.clone();
            tokio::spawn(async move {
                let input = Tensor::from_shape(&[1, length], &vec![value; length]).expect("tensor");
                (length, value, batcher.run(vec![input], terms).await.expect("run"))
            })
        });
        for call in calls {
            let (length, value, batched) = call.await.expect("join");
            assert_eq!(batched.calls, 2, "joined with the other call of length {length}");
            assert_eq!(values(&batched.outputs[0]), vec![value * length as f32]);
        }
        assert_eq!(batcher.stats().runs.load(Ordering::Relaxed), 2);
        assert_eq!(batcher.stats().rows.load(Ordering::Relaxed), 4);
    }

    fn job(urgency: u8, rows: usize, deadline: Instant, shape: usize) -> Job {
        Job {
            inputs: Vec::new(),
            rows,
            shape: vec![vec![shape]],
            urgency,
            max_rows: 64,
            arrived: deadline,
            deadline,
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn a_batch_takes_urgent_rows_first_and_overdue_rows_before_all() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let urgencies = |jobs: &[Job]| jobs.iter().map(|j| j.urgency).collect::<Vec<_>>();
        // Batch (0), standard (1) and realtime (2) calls of one shape, and a
        // realtime call of another: 2 rows go, realtime then standard.
        let mut pending = vec![
            job(0, 1, later, 8),
            job(1, 1, later, 8),
            job(2, 1, later, 8),
            job(2, 1, later, 9),
        ];
        let taken = take(&mut pending, &[vec![8]], 2, now);
        assert_eq!(urgencies(&taken), vec![2, 1]);
        assert_eq!(pending.len(), 2, "the batch call and the other shape wait");
        // A batch-class call past its deadline goes before any realtime one.
        let mut pending = vec![job(2, 1, later, 8), job(0, 1, now, 8), job(2, 1, later, 8)];
        let taken = take(&mut pending, &[vec![8]], 2, now);
        assert_eq!(urgencies(&taken), vec![0, 2]);
        // A call larger than the cap still runs, alone; a smaller one that
        // fits behind a call that does not is taken.
        let mut pending = vec![job(1, 5, later, 8)];
        assert_eq!(take(&mut pending, &[vec![8]], 2, now).len(), 1);
        let mut pending = vec![job(2, 1, later, 8), job(1, 4, later, 8), job(0, 1, later, 8)];
        assert_eq!(urgencies(&take(&mut pending, &[vec![8]], 2, now)), vec![2, 0]);
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

    /// The time each call waited before its run, for calls made at once.
    /// The clock is tokio's paused one: it moves only to the next timer when
    /// nothing else can run, so the waits are exact.
    async fn waits(batcher: &Batcher, calls: Vec<(Vec<Tensor>, CallTerms)>) -> Vec<Duration> {
        let calls: Vec<_> = calls
            .into_iter()
            .map(|(inputs, terms)| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.run(inputs, terms).await.expect("run").queued })
            })
            .collect();
        let mut waits = Vec::new();
        for call in calls {
            waits.push(call.await.expect("join"));
        }
        waits
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_call_waits_for_company_only_when_its_model_asks() {
        let model = Arc::new(CpuDevice::new().prepare(&mlp(1)).expect("prepare"));
        let batcher = Batcher::new(model.clone(), BatchConfig::default(), 2);
        let terms = CallTerms::default();
        assert_eq!(waits(&batcher, vec![(input(0), terms)]).await, vec![Duration::ZERO]);
        // A model's own wait is its own, longer than the server's window.
        let server = BatchConfig {
            window: Duration::from_millis(1),
            ..BatchConfig::default()
        };
        let batcher = Batcher::new(model, server, 2);
        let patient = CallTerms {
            max_delay: Some(Duration::from_millis(5)),
            ..terms
        };
        assert_eq!(
            waits(&batcher, vec![(input(0), patient)]).await,
            vec![Duration::from_millis(5)]
        );
        assert_eq!(
            waits(&batcher, vec![(input(0), terms)]).await,
            vec![Duration::from_millis(1)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_runs_at_its_own_deadline_while_a_more_urgent_group_waits() {
        let model = Arc::new(
            CpuDevice::new()
                .prepare(&hearth_fixtures::models::row_sums())
                .expect("prepare"),
        );
        let batcher = Batcher::new(model, BatchConfig::default(), 1);
        let row = |length: usize| vec![Tensor::from_shape(&[1, length], &vec![1.0f32; length]).expect("tensor")];
        let urgent = CallTerms {
            urgency: 2,
            max_delay: Some(Duration::from_secs(10)),
            ..CallTerms::default()
        };
        let standard = CallTerms {
            max_delay: Some(Duration::from_millis(3)),
            ..CallTerms::default()
        };
        let waited = waits(&batcher, vec![(row(4), urgent), (row(5), standard)]).await;
        assert_eq!(waited, vec![Duration::from_secs(10), Duration::from_millis(3)]);
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
            1,
        );
        let batched = batcher.run(input(0), CallTerms::default()).await.expect("run");
        assert_eq!(batched.calls, 1);
        assert_eq!(batcher.stats().runs.load(Ordering::Relaxed), 1);
    }
}
