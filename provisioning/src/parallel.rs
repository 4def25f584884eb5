//! Spreading per-item work over threads: minting keys and certificates, writing bundles.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Runs `work` on every item on up to `jobs` threads; the results come back in the order of
/// `items`. After the first failure the other threads stop at their next item, and that failure
/// is returned.
pub fn try_map<T: Sync, R: Send>(items: &[T], jobs: usize, work: impl Fn(&T) -> Result<R> + Sync) -> Result<Vec<R>> {
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let jobs = jobs.clamp(1, items.len().max(1));
    let chunk = items.len().div_ceil(jobs).max(1);
    let chunks: Vec<Vec<R>> = std::thread::scope(|scope| {
        let workers: Vec<_> = items
            .chunks(chunk)
            .map(|part| {
                let (failed, first_error, work) = (&failed, &first_error, &work);
                scope.spawn(move || {
                    let mut done = Vec::with_capacity(part.len());
                    for item in part {
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        match work(item) {
                            Ok(result) => done.push(result),
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                            }
                        }
                    }
                    done
                })
            })
            .collect();
        // A worker that panicked would otherwise drop its items silently: pass the panic on.
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(chunks.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_the_order_of_the_items_and_the_first_failure_wins() {
        let items: Vec<u32> = (0..100).collect();
        assert_eq!(
            try_map(&items, 3, |n| Ok(n * 2)).unwrap(),
            items.iter().map(|n| n * 2).collect::<Vec<_>>()
        );
        let failed = try_map(&items, 3, |&n| {
            if n == 42 {
                Err(Error::NotFound("42".into()))
            } else {
                Ok(n)
            }
        });
        assert!(matches!(failed, Err(Error::NotFound(what)) if what == "42"));
    }
}
