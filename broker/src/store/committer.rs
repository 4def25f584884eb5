//! The committer thread: takes what the router recorded, writes it in one transaction, moves the
//! durable watermark and wakes the connections waiting for it. A failed write is retried with
//! everything recorded since, until it succeeds; meanwhile acknowledgements wait.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::database::Database;
use super::{lock, Record, Shared, SyncPolicy};

/// How long a failed write waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// How often a write that keeps failing is logged again.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// At shutdown, how long a failing store is retried before what it holds is given up.
const CLOSE_RETRIES: u32 = 10;

pub(super) fn start(shared: Arc<Shared>, database: Database) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("store-committer".into())
        .spawn(move || run(&shared, database))
}

fn run(shared: &Shared, mut database: Database) {
    let mut batch: Vec<Record> = Vec::new();
    let mut failure: Option<Failure> = None;
    let mut close_retries = 0;
    loop {
        // The batch holds everything recorded up to `through`: earlier failed attempts included.
        let (closing, through) = {
            let mut journal = lock(&shared.journal);
            while journal.records.is_empty() && batch.is_empty() && !journal.closing {
                journal = shared.recorded.wait(journal).unwrap_or_else(|p| p.into_inner());
            }
            if let SyncPolicy::Interval(every) = shared.sync {
                // Let a window's worth gather; a stop request cuts it short.
                let deadline = Instant::now() + every;
                while !journal.closing {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    journal = shared
                        .recorded
                        .wait_timeout(journal, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            batch.append(&mut journal.records);
            (journal.closing, journal.last)
        };
        // After a failed attempt some of the batch may have reached the disk: write every
        // record then, never skipping an enqueue because its removal came in the same batch.
        match database.write(&batch, failure.is_none()) {
            Ok(()) => {
                batch.clear();
                shared.commits.fetch_add(1, Ordering::Relaxed);
                if let Some(failure) = failure.take() {
                    shared.failing.store(false, Ordering::Relaxed);
                    tracing::info!(
                        event = "store_recovered",
                        path = %shared.path.display(),
                        "the store is writable again after {:.1} s; acknowledgements resume",
                        failure.since.elapsed().as_secs_f64()
                    );
                }
                advance(shared, through);
            }
            Err(error) => {
                let now = Instant::now();
                let failure = failure.get_or_insert(Failure {
                    since: now,
                    reported: None,
                });
                shared.failing.store(true, Ordering::Relaxed);
                if failure.reported.is_none_or(|at| now.duration_since(at) >= REPORT_EVERY) {
                    failure.reported = Some(now);
                    tracing::error!(
                        event = "store_write_failed",
                        path = %shared.path.display(),
                        %error,
                        waiting = batch.len(),
                        "cannot write the store: {error}. QoS 1/2 publishes to persistent sessions are not acknowledged until it can be written (the publishers keep them); retrying"
                    );
                }
                if closing {
                    close_retries += 1;
                    if close_retries >= CLOSE_RETRIES {
                        tracing::error!(
                            event = "store_write_failed",
                            path = %shared.path.display(),
                            lost = batch.len(),
                            "stopping with {} changes unwritten: they were never acknowledged",
                            batch.len()
                        );
                        return;
                    }
                }
                std::thread::sleep(RETRY_AFTER);
                continue;
            }
        }
        if closing {
            return;
        }
    }
}

struct Failure {
    since: Instant,
    reported: Option<Instant>,
}

/// Moves the watermark to `through` and wakes the connections whose tickets it now covers.
fn advance(shared: &Shared, through: u64) {
    shared.durable.store(through, Ordering::SeqCst);
    let due = {
        let mut waiting = lock(&shared.waiting);
        let (due, still): (Vec<_>, Vec<_>) = waiting.drain(..).partition(|(ticket, _)| ticket.0 <= through);
        *waiting = still;
        due
    };
    for (_, waiter) in due {
        waiter.queued.store(false, Ordering::SeqCst);
        waiter.waker.wake();
    }
}
