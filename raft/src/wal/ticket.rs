//! Completion handles for appends.
//!
//! The writer thread resolves a ticket once its batch is durable (or failed). A ticket can be
//! waited on from a plain thread (`wait`, a condvar) or awaited from async code (`Future`,
//! a stored `Waker`), so the WAL needs no async runtime of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use super::error::WalError;
use super::record::WalPosition;

pub(crate) type AppendResult = Result<WalPosition, WalError>;

#[derive(Default)]
struct SlotState {
    /// Set once; `result` is taken by the waiter, this flag stays.
    resolved: bool,
    /// A thread is blocked in `wait`; notify the condvar only then (a futex syscall).
    waiting: bool,
    result: Option<AppendResult>,
    waker: Option<Waker>,
    /// Set by `on_durable`: run with the result instead of storing it.
    callback: Option<Callback>,
}

type Callback = Box<dyn FnOnce(AppendResult) + Send>;

/// The shared cell between one appender and the writer thread.
#[derive(Default)]
struct TicketSlot {
    state: Mutex<SlotState>,
    resolved: Condvar,
}

impl TicketSlot {
    fn resolve(&self, result: AppendResult) {
        assert!(
            self.resolve_if_unresolved(result),
            "a WAL ticket is resolved exactly once"
        );
    }

    /// Resolves the ticket unless it already is; returns whether it did.
    fn resolve_if_unresolved(&self, result: AppendResult) -> bool {
        let (waker, waiting) = {
            let mut state = self.state.lock().expect("ticket lock poisoned");
            if state.resolved {
                return false;
            }
            state.resolved = true;
            if let Some(callback) = state.callback.take() {
                drop(state);
                callback(result);
                return true;
            }
            state.result = Some(result);
            (state.waker.take(), state.waiting)
        };
        if waiting {
            self.resolved.notify_all();
        }
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }
}

/// The writer's side of a ticket. Dropping it unresolved (a panicking writer or acker)
/// fails the ticket instead of leaving its caller waiting forever.
pub(crate) struct Resolver {
    slot: Arc<TicketSlot>,
}

impl Resolver {
    pub(crate) fn resolve(self, result: AppendResult) {
        self.slot.resolve(result);
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.slot.resolve_if_unresolved(Err(WalError::Poisoned {
            cause: "the WAL writer stopped before this batch was durable".to_string(),
        }));
    }
}

/// A new ticket and the resolver the writer keeps for it.
pub(crate) fn ticket() -> (AppendTicket, Resolver) {
    let slot = Arc::new(TicketSlot::default());
    (
        AppendTicket {
            slot: Arc::clone(&slot),
            append_no: 0,
        },
        Resolver { slot },
    )
}

/// The promise of one append: resolves to the batch's [`WalPosition`] once the batch is
/// durable (fdatasync completed), or to the error that made it fail.
///
/// Use [`wait`](Self::wait) from a thread, or `.await` it from async code.
#[must_use = "an append is acknowledged only once its ticket resolves"]
pub struct AppendTicket {
    slot: Arc<TicketSlot>,
    /// The batch's place in append order, for [`Wal::is_durable`](super::Wal::is_durable).
    pub(crate) append_no: u64,
}

impl AppendTicket {
    /// The batch's place in append order (1 for the first batch this WAL handle queued):
    /// [`Wal::is_durable`](super::Wal::is_durable) says whether it is durable yet.
    pub fn append_no(&self) -> u64 {
        self.append_no
    }

    /// Run `f` with the outcome once the batch is durable or failed: on the WAL's acker
    /// thread, or right here if that already happened. It saves an async task's wake-up
    /// per append (openraft's flush callbacks need no task). `f` must be quick and must not
    /// block: it delays the acknowledgements after it.
    pub fn on_durable(self, f: impl FnOnce(Result<WalPosition, WalError>) + Send + 'static) {
        let mut state = self.slot.state.lock().expect("ticket lock poisoned");
        if let Some(result) = state.result.take() {
            drop(state);
            f(result);
            return;
        }
        debug_assert!(
            !state.resolved,
            "a resolved ticket holds its result until taken"
        );
        state.callback = Some(Box::new(f));
    }

    /// Blocks the calling thread until the batch is durable or failed.
    pub fn wait(self) -> Result<WalPosition, WalError> {
        let mut state = self.slot.state.lock().expect("ticket lock poisoned");
        loop {
            if let Some(result) = state.result.take() {
                return result;
            }
            state.waiting = true;
            state = self
                .slot
                .resolved
                .wait(state)
                .expect("ticket lock poisoned");
            state.waiting = false;
        }
    }

    /// Whether the batch is already durable or failed (then `wait` returns at once).
    pub fn is_resolved(&self) -> bool {
        self.slot
            .state
            .lock()
            .expect("ticket lock poisoned")
            .resolved
    }
}

impl Future for AppendTicket {
    type Output = Result<WalPosition, WalError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.slot.state.lock().expect("ticket lock poisoned");
        if let Some(result) = state.result.take() {
            return Poll::Ready(result);
        }
        match &state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl std::fmt::Debug for AppendTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let resolved = self.slot.state.lock().map(|s| s.resolved).unwrap_or(false);
        f.debug_struct("AppendTicket")
            .field("resolved", &resolved)
            .finish()
    }
}
