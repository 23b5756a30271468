//! Pool and queue logic under paused time. Instances are plain numbers: the
//! scheduler never looks inside them.

use super::*;

fn spec(max_instances: u32) -> FunctionSpec {
    FunctionSpec {
        code: "code".into(),
        max_instances,
        min_instances: 0,
        idle_timeout: Duration::from_secs(60),
        reuse: true,
    }
}

fn scheduler(config: SchedulerConfig) -> Scheduler<u32> {
    Scheduler::new(config)
}

/// Version 1 of tenant `t`'s function `name`.
fn key(name: &str) -> FunctionKey {
    FunctionKey::new("t", name, 1)
}

/// The function names of the code a reap unloaded.
fn unloaded(reaped: &Reaped<u32>) -> Vec<String> {
    reaped.unloaded.iter().map(|u| u.key.function.to_string()).collect()
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

/// Runs one request on `f`: takes the warm instance or "creates" `fresh`,
/// and gives it back. Returns the instance it ran on.
async fn run_once(s: &Scheduler<u32>, f: &str, spec: &FunctionSpec, fresh: u32) -> u32 {
    run_on(s, &key(f), spec, fresh).await
}

/// [`run_once`] on a given function version.
async fn run_on(s: &Scheduler<u32>, f: &FunctionKey, spec: &FunctionSpec, fresh: u32) -> u32 {
    let mut lease = s.acquire(f, spec, Qos::Standard, far()).await.expect("admitted");
    let instance = lease.take_instance().unwrap_or(fresh);
    lease.finish(Some(instance));
    instance
}

#[tokio::test(start_paused = true)]
async fn warm_instances_are_reused_and_reaped_after_their_idle_timeout() {
    let s = scheduler(SchedulerConfig::default());
    let spec = spec(4);
    assert_eq!(run_once(&s, "f", &spec, 1).await, 1);
    assert_eq!(
        run_once(&s, "f", &spec, 2).await,
        1,
        "second request reuses the warm instance"
    );
    let stats = s.function_stats(&key("f")).expect("pool");
    assert_eq!((stats.cold_starts, stats.warm_starts, stats.idle), (1, 1, 1));

    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(s.reap(Instant::now()).instances.is_empty(), "not idle long enough");
    tokio::time::advance(Duration::from_secs(1)).await;
    let reaped = s.reap(Instant::now());
    assert_eq!(reaped.instances, vec![1]);
    assert!(
        reaped.unloaded.is_empty(),
        "compiled code outlives the instance for a while"
    );
    let stats = s.function_stats(&key("f")).expect("pool");
    assert_eq!((stats.idle, stats.scale_downs, stats.loaded), (0, 1, true));

    tokio::time::advance(DEFAULT_FUNCTION_IDLE).await;
    let reaped = s.reap(Instant::now());
    assert_eq!(
        unloaded(&reaped),
        vec!["f".to_owned()],
        "second tier: the function unloads"
    );
    assert!(!s.function_stats(&key("f")).expect("pool").loaded);
    assert!(s.reap(Instant::now()).unloaded.is_empty(), "unloaded once");

    assert_eq!(run_once(&s, "f", &spec, 3).await, 3, "back from zero: a cold start");
    let stats = s.function_stats(&key("f")).expect("pool");
    assert_eq!((stats.cold_starts, stats.loaded), (2, true));
}

#[tokio::test(start_paused = true)]
async fn reuse_stops_at_the_limit() {
    let s = scheduler(SchedulerConfig {
        reuse_limit: 3,
        ..SchedulerConfig::default()
    });
    let spec = spec(1);
    let ran: Vec<u32> = {
        let mut ran = Vec::new();
        for fresh in 1..=7 {
            ran.push(run_once(&s, "f", &spec, fresh).await);
        }
        ran
    };
    assert_eq!(ran, vec![1, 1, 1, 4, 4, 4, 7], "each instance serves three requests");
    assert_eq!(s.totals(), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn functions_without_reuse_get_a_fresh_instance_each_time() {
    let s = scheduler(SchedulerConfig::default());
    let spec = FunctionSpec {
        reuse: false,
        ..spec(1)
    };
    assert_eq!(run_once(&s, "f", &spec, 1).await, 1);
    assert_eq!(run_once(&s, "f", &spec, 2).await, 2);
    assert_eq!(s.totals(), (0, 0), "nothing kept");
}

#[tokio::test(start_paused = true)]
async fn trapped_or_dropped_instances_are_not_reused() {
    let s = scheduler(SchedulerConfig::default());
    let spec = spec(2);
    let mut lease = s
        .acquire(&key("f"), &spec, Qos::Standard, far())
        .await
        .expect("admitted");
    assert!(lease.take_instance().is_none());
    lease.finish(None); // trapped
    assert_eq!(run_once(&s, "f", &spec, 2).await, 2, "fresh after a trap");

    let lease = s
        .acquire(&key("f"), &spec, Qos::Standard, far())
        .await
        .expect("admitted");
    assert!(!lease.is_cold());
    drop(lease); // the request's task went away mid-call
    assert_eq!(run_once(&s, "f", &spec, 3).await, 3, "fresh after a dropped lease");
    assert_eq!(s.totals(), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_new_version_never_gets_old_instances() {
    let s = scheduler(SchedulerConfig::default());
    let spec = spec(2);
    let (v1, v2) = (key("f"), FunctionKey::new("t", "f", 2));
    let busy = s.acquire(&v1, &spec, Qos::Standard, far()).await.expect("admitted");
    assert_eq!(run_on(&s, &v1, &spec, 1).await, 1);
    // The deploy of v2 retires every other version.
    s.retire(|k| k.is_version_of("t", "f") && k.version != 2);
    assert_eq!(run_on(&s, &v2, &spec, 2).await, 2, "v1's idle instance is dropped");
    busy.finish(Some(9));
    assert_eq!(
        run_on(&s, &v2, &spec, 3).await,
        2,
        "v1's busy instance is not kept either"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retired_version_called_again_keeps_its_instances() {
    let s = scheduler(SchedulerConfig::default());
    let spec = spec(2);
    let (v1, v2) = (key("f"), FunctionKey::new("t", "f", 2));
    let busy = s.acquire(&v1, &spec, Qos::Standard, far()).await.expect("admitted");
    s.retire(|k| k.is_version_of("t", "f") && k.version != 2);
    run_on(&s, &v2, &spec, 1).await;
    // `f@1` is called again while its busy instance runs: its instances
    // go back to its pool when done, and serve the next call.
    run_on(&s, &v1, &spec, 2).await;
    busy.finish(Some(9));
    assert_ne!(run_on(&s, &v1, &spec, 3).await, 3, "v1's instances are reused");
}

#[tokio::test(start_paused = true)]
async fn a_retired_version_goes_once_nothing_of_it_runs_and_its_code_unloads() {
    let s = scheduler(SchedulerConfig::default());
    let (v1, v2) = (key("f"), FunctionKey::new("t", "f", 2));
    let old = FunctionSpec {
        code: "old".into(),
        ..spec(2)
    };
    let busy = s.acquire(&v1, &old, Qos::Standard, far()).await.expect("admitted");
    s.retire(|k| k.is_version_of("t", "f") && k.version != 2);
    run_on(&s, &v2, &spec(2), 1).await;
    assert!(s.reap(Instant::now()).unloaded.is_empty(), "v1 still runs a request");
    assert!(s.function_stats(&v1).is_some());
    busy.finish(Some(7));
    let reaped = s.reap(Instant::now());
    assert_eq!(
        reaped.unloaded,
        vec![Unloaded {
            key: v1.clone(),
            code: "old".into()
        }],
        "no lookup needed: the reap says which code to unload"
    );
    assert!(s.function_stats(&v1).is_none(), "the retired pool is gone");
    assert_eq!(s.stats().len(), 1);

    // A retired version whose code the new one shares leaves it loaded.
    let v3 = FunctionKey::new("t", "f", 3);
    s.retire(|k| k.is_version_of("t", "f") && k.version != 3);
    run_on(&s, &v3, &spec(2), 2).await;
    assert!(s.reap(Instant::now()).unloaded.is_empty(), "v3 runs the same code");
    assert!(s.function_stats(&v2).is_none());
}

#[tokio::test(start_paused = true)]
async fn realtime_overtakes_queued_batch() {
    let s = scheduler(SchedulerConfig::default());
    let spec = spec(1);
    let running = s
        .acquire(&key("f"), &spec, Qos::Standard, far())
        .await
        .expect("admitted");
    let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
    for class in [Qos::Batch, Qos::Standard, Qos::Realtime] {
        let (s, spec, order_tx) = (s.clone(), spec.clone(), order_tx.clone());
        tokio::spawn(async move {
            let lease = s.acquire(&key("f"), &spec, class, far()).await.expect("admitted");
            order_tx.send(class).expect("receiver");
            lease.finish(Some(0));
        });
        // Let it enqueue before the next one (no time passes).
        tokio::task::yield_now().await;
    }
    assert_eq!(s.function_stats(&key("f")).expect("pool").queued, [1, 1, 1]);
    running.finish(Some(0));
    let mut order = Vec::new();
    for _ in 0..3 {
        order.push(order_rx.recv().await.expect("sender"));
    }
    assert_eq!(order, vec![Qos::Realtime, Qos::Standard, Qos::Batch]);
}

#[tokio::test(start_paused = true)]
async fn batch_eventually_runs_under_steady_realtime_load() {
    let s = scheduler(SchedulerConfig {
        aging: Duration::from_millis(100),
        ..SchedulerConfig::default()
    });
    let spec = spec(1);
    let mut running = s
        .acquire(&key("f"), &spec, Qos::Realtime, far())
        .await
        .expect("admitted");
    let batch = {
        let (s, spec) = (s.clone(), spec.clone());
        tokio::spawn(async move {
            s.acquire(&key("f"), &spec, Qos::Batch, far())
                .await
                .map(|l| l.finish(Some(0)))
        })
    };
    tokio::task::yield_now().await;
    // A realtime request always waits behind the running one; every 10 ms
    // the running request finishes and the next takes over.
    let mut realtime_served = 0;
    while !batch.is_finished() {
        assert!(realtime_served < 1000, "batch starved");
        let next = {
            let (s, spec) = (s.clone(), spec.clone());
            tokio::spawn(async move { s.acquire(&key("f"), &spec, Qos::Realtime, far()).await })
        };
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_millis(10)).await;
        running.finish(Some(0));
        tokio::task::yield_now().await;
        if batch.is_finished() {
            // The batch request took the slot; the realtime one gets it next.
            running = next.await.expect("task").expect("admitted");
            break;
        }
        running = next.await.expect("task").expect("admitted");
        realtime_served += 1;
    }
    batch.await.expect("task").expect("batch admitted");
    assert!(
        (10..=40).contains(&realtime_served),
        "batch ran after {realtime_served} realtime requests (aging: two classes in about 200 ms)"
    );
    running.finish(Some(0));
}

#[tokio::test(start_paused = true)]
async fn a_full_function_queue_is_too_many_requests() {
    let s = scheduler(SchedulerConfig {
        max_queued_per_function: 2,
        ..SchedulerConfig::default()
    });
    let spec = spec(1);
    let _running = s
        .acquire(&key("f"), &spec, Qos::Standard, far())
        .await
        .expect("admitted");
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let (s, spec) = (s.clone(), spec.clone());
        waiting.push(tokio::spawn(async move {
            s.acquire(&key("f"), &spec, Qos::Standard, far()).await.map(drop)
        }));
        tokio::task::yield_now().await;
    }
    let err = s
        .acquire(&key("f"), &spec, Qos::Standard, far())
        .await
        .expect_err("queue full");
    assert!(matches!(err, Rejection::FunctionBusy { queued: 2, .. }), "{err:?}");
    assert!(err.is_function_limit());
    assert_eq!(err.retry_after(), RETRY_AFTER);
    assert_eq!(s.function_stats(&key("f")).expect("pool").rejected, 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_server_queue_is_no_capacity() {
    let s = scheduler(SchedulerConfig {
        max_instances: 1,
        max_queued: 1,
        ..SchedulerConfig::default()
    });
    let spec = spec(4);
    let _running = s
        .acquire(&key("f"), &spec, Qos::Standard, far())
        .await
        .expect("admitted");
    let (s2, spec2) = (s.clone(), spec.clone());
    let _waiting = tokio::spawn(async move { s2.acquire(&key("g"), &spec2, Qos::Standard, far()).await.map(drop) });
    tokio::task::yield_now().await;
    let err = s
        .acquire(&key("h"), &spec, Qos::Standard, far())
        .await
        .expect_err("server full");
    assert!(matches!(err, Rejection::Capacity { .. }), "{err:?}");
    assert!(!err.is_function_limit());
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_gives_up_at_its_deadline() {
    let s = scheduler(SchedulerConfig::default());
    let spec = spec(1);
    let running = s
        .acquire(&key("f"), &spec, Qos::Standard, far())
        .await
        .expect("admitted");
    let deadline = Instant::now() + Duration::from_millis(250);
    let err = s
        .acquire(&key("f"), &spec, Qos::Batch, deadline)
        .await
        .expect_err("deadline");
    assert_eq!(
        err,
        Rejection::Deadline {
            waited: Duration::from_millis(250),
            function_busy: true
        }
    );
    assert_eq!(s.totals(), (1, 0), "the queue is empty again");
    running.finish(Some(1));
    assert_eq!(run_once(&s, "f", &spec, 2).await, 1);
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_goes_away_leaves_the_queue() {
    let s = scheduler(SchedulerConfig::default());
    let spec = spec(1);
    let running = s
        .acquire(&key("f"), &spec, Qos::Standard, far())
        .await
        .expect("admitted");
    let (s2, spec2) = (s.clone(), spec.clone());
    let waiter = tokio::spawn(async move { s2.acquire(&key("f"), &spec2, Qos::Standard, far()).await.map(drop) });
    tokio::task::yield_now().await;
    assert_eq!(s.totals(), (1, 1));
    waiter.abort();
    let _ = waiter.await;
    assert_eq!(s.totals(), (1, 0));
    running.finish(Some(1));
    assert_eq!(s.function_stats(&key("f")).expect("pool").idle, 1);
}

#[tokio::test(start_paused = true)]
async fn idle_instances_of_other_functions_make_room() {
    let s = scheduler(SchedulerConfig {
        max_instances: 2,
        ..SchedulerConfig::default()
    });
    let spec = spec(4);
    run_once(&s, "a", &spec, 1).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    run_once(&s, "b", &spec, 2).await;
    assert_eq!(s.totals(), (2, 0));
    assert_eq!(run_once(&s, "c", &spec, 3).await, 3);
    assert_eq!(
        s.function_stats(&key("a")).expect("pool").idle,
        0,
        "the longest idle went"
    );
    assert_eq!(s.function_stats(&key("b")).expect("pool").idle, 1);
    assert_eq!(s.totals(), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn min_instances_stay_warm() {
    let s = scheduler(SchedulerConfig::default());
    let spec = FunctionSpec {
        min_instances: 2,
        idle_timeout: Duration::from_secs(1),
        ..spec(4)
    };
    for fresh in [10, 11] {
        s.reserve_warm(&key("f"), &spec).expect("room").park(fresh);
    }
    assert!(s.reserve_warm(&key("f"), &spec).is_none(), "two is enough");
    let stats = s.function_stats(&key("f")).expect("pool");
    assert_eq!((stats.idle, stats.cold_starts), (2, 0));
    assert_eq!(run_once(&s, "f", &spec, 1).await, 11, "served warm");
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert!(s.reap(Instant::now()).instances.is_empty(), "never below min_instances");
    assert!(s.reap(Instant::now()).unloaded.is_empty());
}

#[tokio::test(start_paused = true)]
async fn retire_drops_idle_instances_and_stops_reuse() {
    let s = scheduler(SchedulerConfig::default());
    let spec = spec(2);
    let busy = s
        .acquire(&key("f"), &spec, Qos::Standard, far())
        .await
        .expect("admitted");
    run_once(&s, "f", &spec, 1).await;
    s.retire(|k| k.is_version_of("t", "f"));
    busy.finish(Some(2));
    assert_eq!(s.totals(), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_deployed_function_that_never_ran_unloads_too() {
    let s = scheduler(SchedulerConfig::default());
    s.track_loaded(&key("f"), &spec(1));
    assert!(s.reap(Instant::now()).unloaded.is_empty());
    tokio::time::advance(DEFAULT_FUNCTION_IDLE).await;
    assert_eq!(unloaded(&s.reap(Instant::now())), vec!["f".to_owned()]);
}

#[tokio::test(start_paused = true)]
async fn busy_counts_running_invocations_across_functions() {
    let s = scheduler(SchedulerConfig::default());
    let spec = spec(4);
    assert_eq!(s.busy(), 0);
    let mut a = s
        .acquire(&key("f"), &spec, Qos::Standard, far())
        .await
        .expect("admitted");
    let b = s
        .acquire(&key("g"), &spec, Qos::Standard, far())
        .await
        .expect("admitted");
    assert_eq!(s.busy(), 2, "a cold start being created counts");
    let instance = a.take_instance().unwrap_or(1);
    a.finish(Some(instance));
    assert_eq!(s.busy(), 1, "an idle instance does not");
    drop(b);
    assert_eq!(s.busy(), 0);
}
