//! The tunnel's connection pool: one connection per key, opened once however
//! many callers ask for it at the same moment, and never under a lock.
//!
//! Lessons of istio/ztunnel's pool (PR 2017): no lock is held across a
//! handshake (the map lock is taken only to look and to settle), only the
//! waiters of the key being opened wait for it, a failure is remembered per
//! key for a short while so a dead peer is not hammered, and an open that its
//! first caller gave up on still finishes (it runs on its own task), so no
//! key is left stuck "opening".
//!
//! ```text
//!   (none) --get--> Opening --ok--> Ready{conn, until} --closed or past until--> (none)
//!                      |                                  --evict--> (none)
//!                      +--err--> Failed{until} --past until--> (none)
//! ```
use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use tokio::time::Instant;

/// A pooled connection: cheap to clone (a handle), and able to say whether
/// it can still carry new streams.
pub trait Conn: Clone + Send + Sync + 'static {
    fn is_open(&self) -> bool;
}

type Opening<C, E> = Shared<BoxFuture<'static, Result<C, Arc<E>>>>;

enum Entry<C, E> {
    Opening(Opening<C, E>),
    /// Reusable for new streams until `until` (the earliest expiry of the
    /// certificates it was opened with).
    Ready {
        conn: C,
        until: Instant,
    },
    /// The last open failed; callers fail fast with its error until `until`.
    Failed {
        error: Arc<E>,
        until: Instant,
    },
}

/// What a caller does for a key, decided from its entry alone.
enum Step<C, E> {
    Use(C),
    Join(Opening<C, E>),
    Fail(Arc<E>),
    Open,
}

fn step<C: Conn, E>(entry: Option<&Entry<C, E>>, now: Instant) -> Step<C, E> {
    match entry {
        Some(Entry::Ready { conn, until }) if conn.is_open() && now < *until => {
            Step::Use(conn.clone())
        }
        Some(Entry::Opening(f)) => Step::Join(f.clone()),
        Some(Entry::Failed { error, until }) if now < *until => Step::Fail(error.clone()),
        _ => Step::Open,
    }
}

pub struct Pool<K, C, E> {
    entries: Arc<Mutex<HashMap<K, Entry<C, E>>>>,
    /// How long a failed open is remembered.
    retry_after: Duration,
}

impl<K, C, E> Pool<K, C, E>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    C: Conn,
    E: Send + Sync + 'static,
{
    pub fn new(retry_after: Duration) -> Self {
        Pool {
            entries: Arc::default(),
            retry_after,
        }
    }

    /// The connection for `key`: the pooled one, the one being opened, or a
    /// new one from `open`, which yields it with the instant until which it
    /// may carry new streams. `open` should be time-limited by its caller's
    /// own deadline; the pool adds none.
    pub async fn get<F, Fut>(&self, key: &K, open: F) -> Result<C, Arc<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(C, Instant), E>> + Send + 'static,
    {
        let opening = {
            let mut entries = lock(&self.entries);
            match step(entries.get(key), Instant::now()) {
                Step::Use(conn) => return Ok(conn),
                Step::Fail(error) => return Err(error),
                Step::Join(f) => f,
                Step::Open => {
                    let f = self.spawn_open(key.clone(), open());
                    entries.insert(key.clone(), Entry::Opening(f.clone()));
                    f
                }
            }
        };
        opening.await
    }

    /// Runs `open` on its own task, which settles the entry when it ends.
    fn spawn_open<Fut>(&self, key: K, open: Fut) -> Opening<C, E>
    where
        Fut: Future<Output = Result<(C, Instant), E>> + Send + 'static,
    {
        let entries = self.entries.clone();
        let retry_after = self.retry_after;
        let task = tokio::spawn(async move {
            let result = open.await;
            let mut entries = lock(&entries);
            match result {
                Ok((conn, until)) => {
                    entries.insert(
                        key,
                        Entry::Ready {
                            conn: conn.clone(),
                            until,
                        },
                    );
                    Ok(conn)
                }
                Err(e) => {
                    let error = Arc::new(e);
                    entries.insert(
                        key,
                        Entry::Failed {
                            error: error.clone(),
                            until: Instant::now() + retry_after,
                        },
                    );
                    Err(error)
                }
            }
        });
        async move {
            match task.await {
                Ok(result) => result,
                // The open panicked or the runtime is going away; the
                // entry stays Opening only as long as the runtime lives.
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        .boxed()
        .shared()
    }

    /// Forgets `key`'s pooled connection if `is_it` says it is the one a
    /// caller found broken (a stream on it timed out), so the next caller
    /// opens a new one. A connection opened since is left alone.
    pub fn evict(&self, key: &K, is_it: impl Fn(&C) -> bool) {
        let mut entries = lock(&self.entries);
        if let Some(Entry::Ready { conn, .. }) = entries.get(key)
            && is_it(conn)
        {
            entries.remove(key);
        }
    }

    /// Drops entries that can serve no one any more.
    pub fn sweep(&self) {
        let now = Instant::now();
        lock(&self.entries).retain(|_, e| match e {
            Entry::Ready { conn, until } => conn.is_open() && now < *until,
            Entry::Failed { until, .. } => now < *until,
            Entry::Opening(_) => true,
        });
    }

    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    #[derive(Clone, Debug)]
    struct Fake {
        id: usize,
        open: Arc<AtomicBool>,
    }

    impl Conn for Fake {
        fn is_open(&self) -> bool {
            self.open.load(Ordering::SeqCst)
        }
    }

    #[derive(Debug, PartialEq)]
    struct Refused(usize);

    type TestPool = Pool<&'static str, Fake, Refused>;

    const LONG: Duration = Duration::from_secs(3600);

    /// An opener that counts its calls, takes `delay`, and fails when `fail`.
    fn opener(
        calls: &Arc<AtomicUsize>,
        delay: Duration,
        fail: bool,
    ) -> impl FnOnce() -> BoxFuture<'static, Result<(Fake, Instant), Refused>> + use<> {
        let calls = calls.clone();
        move || {
            let id = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(delay).await;
                if fail {
                    Err(Refused(id))
                } else {
                    let conn = Fake {
                        id,
                        open: Arc::new(AtomicBool::new(true)),
                    };
                    Ok((conn, Instant::now() + LONG))
                }
            }
            .boxed()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_for_one_key_opens_once_and_shares_it() {
        let pool = Arc::new(TestPool::new(Duration::from_secs(1)));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (pool, calls) = (pool.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                pool.get(&"a", opener(&calls, Duration::from_millis(100), false))
                    .await
                    .map(|c| c.id)
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(0));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let again = pool.get(&"a", opener(&calls, Duration::ZERO, false)).await;
        assert_eq!(again.unwrap().id, 0, "the pooled connection is reused");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_open_for_one_key_does_not_stall_another() {
        let pool = Arc::new(TestPool::new(Duration::from_secs(1)));
        let calls = Arc::new(AtomicUsize::new(0));
        let stuck = {
            let (pool, calls) = (pool.clone(), calls.clone());
            tokio::spawn(async move { pool.get(&"dead", opener(&calls, LONG, false)).await })
        };
        tokio::task::yield_now().await;
        let other = tokio::time::timeout(
            Duration::from_secs(1),
            pool.get(&"alive", opener(&calls, Duration::from_millis(10), false)),
        )
        .await
        .expect("another key is served while the first one hangs");
        assert!(other.is_ok());
        assert!(!stuck.is_finished());
        stuck.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_reaches_every_waiter_and_is_remembered_briefly() {
        let pool = Arc::new(TestPool::new(Duration::from_secs(1)));
        let calls = Arc::new(AtomicUsize::new(0));
        let (a, b) = tokio::join!(
            pool.get(&"k", opener(&calls, Duration::from_millis(50), true)),
            pool.get(&"k", opener(&calls, Duration::from_millis(50), true)),
        );
        assert_eq!(*a.unwrap_err(), Refused(0));
        assert_eq!(*b.unwrap_err(), Refused(0), "waiters share the one attempt");
        let fast = pool.get(&"k", opener(&calls, Duration::ZERO, false)).await;
        assert_eq!(
            *fast.unwrap_err(),
            Refused(0),
            "failed fast, no new attempt"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(1001)).await;
        let later = pool.get(&"k", opener(&calls, Duration::ZERO, false)).await;
        assert_eq!(later.unwrap().id, 1, "tried again after the retry delay");
    }

    #[tokio::test(start_paused = true)]
    async fn closed_expired_and_evicted_connections_are_replaced() {
        let pool = TestPool::new(Duration::from_secs(1));
        let calls = Arc::new(AtomicUsize::new(0));
        let first = pool
            .get(&"k", opener(&calls, Duration::ZERO, false))
            .await
            .unwrap();
        first.open.store(false, Ordering::SeqCst);
        let second = pool
            .get(&"k", opener(&calls, Duration::ZERO, false))
            .await
            .unwrap();
        assert_eq!(second.id, 1, "a closed connection is not reused");

        pool.evict(&"k", |c| c.id == 0);
        let same = pool
            .get(&"k", opener(&calls, Duration::ZERO, false))
            .await
            .unwrap();
        assert_eq!(
            same.id, 1,
            "evicting a connection no longer pooled changes nothing"
        );
        pool.evict(&"k", |c| c.id == 1);
        let third = pool
            .get(&"k", opener(&calls, Duration::ZERO, false))
            .await
            .unwrap();
        assert_eq!(third.id, 2);

        let short = || async {
            let conn = Fake {
                id: 99,
                open: Arc::new(AtomicBool::new(true)),
            };
            Ok::<_, Refused>((conn, Instant::now() + Duration::from_secs(5)))
        };
        assert_eq!(pool.get(&"cert", short).await.unwrap().id, 99);
        tokio::time::sleep(Duration::from_secs(6)).await;
        let renewed = pool
            .get(&"cert", opener(&calls, Duration::ZERO, false))
            .await
            .unwrap();
        assert_ne!(renewed.id, 99, "not reused past its certificates' expiry");
        pool.sweep();
        assert_eq!(pool.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_abandoned_by_its_caller_still_settles() {
        let pool = TestPool::new(Duration::from_secs(1));
        let calls = Arc::new(AtomicUsize::new(0));
        let gave_up = tokio::time::timeout(
            Duration::from_millis(10),
            pool.get(&"k", opener(&calls, Duration::from_millis(100), false)),
        )
        .await;
        assert!(gave_up.is_err());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let conn = pool
            .get(&"k", opener(&calls, Duration::ZERO, false))
            .await
            .unwrap();
        assert_eq!(conn.id, 0, "the abandoned open finished and was pooled");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
