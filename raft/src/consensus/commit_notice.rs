//! Commit notices ride on other peer traffic instead of costing a round trip each.
//!
//! Once a leader commits an entry, openraft's replication task sends each follower an
//! AppendEntries with no entries whose only news is the new commit index (followers need it
//! to apply). With one client writing in a loop, that was one extra peer batch per follower
//! per write: 2 of the 3.9 peer batches a lone put cost (docs/benchmarks.md), each a peer RPC,
//! wake-ups on both nodes and an answer, on two shared cores. The client's next write follows
//! within a fraction of a millisecond, usually in another group, and its AppendEntries goes to
//! the same followers.
//!
//! [`AppendStream`] runs one replication session's requests: requests with entries one at a
//! time, as openraft's default does (a follower must see a group's appends in order, and the
//! calls of a peer batch run concurrently); a commit notice in the middle of a session is sent
//! *deferred* ([`super::batch::Batcher::call_held`]): it rides on the next batch to that
//! peer, of any group, or leaves alone once `hold` has passed. A notice the session's next
//! request makes redundant (it is already waiting: same leader, same previous log id, a commit
//! index at least as new) is not sent at all. The last request of a stream (a heartbeat, or
//! the probe that opens a session) is never deferred. A leader that answers a proposal a
//! follower forwarded sends that follower's notices at once for [`RELEASE_WINDOW`]: the
//! follower usually serves a read of what it just wrote next.
//!
//! Why reordering a notice is safe: it carries no entries, so a follower that gets it after a
//! later request of its group only checks that its log holds the previous log id (it does: the
//! leader learned that from the follower). Nothing is truncated or appended, and openraft only
//! ever raises a follower's commit index and accepted log position, and applies only entries
//! it has flushed from this leader (`RaftState::update_committed`, `accept_log_io`); its own
//! heartbeats, sent by a task of their own, already reach followers interleaved with
//! replication this way. Leader leases are unaffected too: openraft credits an
//! acknowledgement from the time the request was *generated*, so a late answer gives an older
//! credit, never a newer one. Followers apply a committed entry at most `hold` later than
//! before when no other traffic comes.

use super::types::{AppendEntriesRequest, AppendEntriesResponse, CalmRaft, LogId};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use openraft::entry::RaftEntry;
use openraft::errors::RPCError;
use openraft::raft::StreamAppendResult;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// How long after answering a peer's forwarded proposal this node sends that peer's commit
/// notices at once: long enough to cover the notice of the proposal's own entry, which the
/// replication task may queue a few scheduler turns after the answer.
pub const RELEASE_WINDOW: Duration = Duration::from_millis(5);

/// Longest a commit notice may wait for other traffic (`[raft] commit_notice_hold_us` may not
/// exceed it): followers apply committed entries at most this much later.
pub const COMMIT_NOTICE_HOLD_MAX: Duration = Duration::from_millis(50);

/// A request's answer, and whether the session must stop after it (an error, a conflict, a
/// higher vote, or a partial success: as in openraft's sequential default).
type Answer = (
    Result<StreamAppendResult<CalmRaft>, RPCError<CalmRaft>>,
    bool,
);
type Sending = BoxFuture<'static, Answer>;

/// Sends one AppendEntries to the session's follower; `Some(hold)` defers it.
pub type SendAppend = Box<
    dyn FnMut(
            AppendEntriesRequest,
            Option<Duration>,
        ) -> BoxFuture<'static, Result<AppendEntriesResponse, RPCError<CalmRaft>>>
        + Send,
>;

/// One replication session's requests and their answers (see the module docs).
pub struct AppendStream<S> {
    input: S,
    input_done: bool,
    send: SendAppend,
    hold: Duration,
    /// The request with entries (or the stream's last request) being sent: at most one.
    in_flight: Option<Sending>,
    /// Commit notices sent deferred, not answered yet.
    notices: FuturesUnordered<Sending>,
    /// An answer ended the session: yield nothing more.
    stopped: bool,
}

impl<S> AppendStream<S> {
    pub fn new(input: S, send: SendAppend, hold: Duration) -> AppendStream<S> {
        assert!(hold <= COMMIT_NOTICE_HOLD_MAX);
        AppendStream {
            input,
            input_done: false,
            send,
            hold,
            in_flight: None,
            notices: FuturesUnordered::new(),
            stopped: false,
        }
    }

    fn start(&mut self, request: AppendEntriesRequest, hold: Option<Duration>) -> Sending {
        let prev = request.prev_log_id;
        let last: Option<LogId> = request.entries.last().map(|e| e.log_id()).or(prev);
        let sent = (self.send)(request, hold);
        Box::pin(async move {
            match sent.await {
                Err(e) => (Err(e), true),
                Ok(response) => {
                    let partial = matches!(
                        &response,
                        AppendEntriesResponse::PartialSuccess(matched) if *matched != last
                    );
                    let result = response.into_stream_result(prev, last);
                    let stop = partial || result.is_err();
                    (Ok(result), stop)
                }
            }
        })
    }
}

/// Whether sending `later` tells the follower everything the notice `held` would: the same
/// leader, the same previous log id, and a commit index at least as new.
fn absorbs(later: &AppendEntriesRequest, held: &AppendEntriesRequest) -> bool {
    later.vote == held.vote
        && later.prev_log_id == held.prev_log_id
        && later.leader_commit >= held.leader_commit
}

impl<S> Stream for AppendStream<S>
where
    S: Stream<Item = AppendEntriesRequest> + Unpin,
{
    type Item = Result<StreamAppendResult<CalmRaft>, RPCError<CalmRaft>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.stopped {
                return Poll::Ready(None);
            }
            let answered = match this.in_flight.as_mut().map(|f| f.as_mut().poll(cx)) {
                Some(Poll::Ready(answer)) => {
                    this.in_flight = None;
                    Some(answer)
                }
                _ => match this.notices.poll_next_unpin(cx) {
                    Poll::Ready(Some(answer)) => Some(answer),
                    _ => None,
                },
            };
            if let Some((result, stop)) = answered {
                this.stopped = stop;
                return Poll::Ready(Some(result));
            }
            if this.in_flight.is_some() || this.input_done {
                if this.in_flight.is_none() && this.notices.is_empty() {
                    return Poll::Ready(None);
                }
                return Poll::Pending;
            }
            // Nothing with entries in flight: take the next request.
            let request = match this.input.poll_next_unpin(cx) {
                Poll::Ready(Some(request)) => request,
                Poll::Ready(None) => {
                    this.input_done = true;
                    continue;
                }
                Poll::Pending => return Poll::Pending,
            };
            if !request.entries.is_empty() || this.hold.is_zero() {
                this.in_flight = Some(this.start(request, None));
                continue;
            }
            // A notice: look at what follows it now, without waiting.
            match this.input.poll_next_unpin(cx) {
                Poll::Ready(Some(next)) => {
                    if !absorbs(&next, &request) {
                        let notice = this.start(request, Some(this.hold));
                        this.notices.push(notice);
                    }
                    this.in_flight = Some(this.start(next, None));
                }
                Poll::Ready(None) => {
                    // The stream's last request (a heartbeat, a session's opening probe).
                    this.input_done = true;
                    this.in_flight = Some(this.start(request, None));
                }
                Poll::Pending => {
                    let notice = this.start(request, Some(this.hold));
                    this.notices.push(notice);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::types::{Entry, Vote};
    use openraft::vote::RaftLeaderId;
    use std::sync::{Arc, Mutex};
    use tokio::sync::{mpsc, oneshot};
    use tokio_stream::wrappers::UnboundedReceiverStream;

    fn log_id(index: u64) -> LogId {
        LogId::new(
            openraft::impls::leader_id_adv::LeaderId::new(1, 1).to_committed(),
            index,
        )
    }

    fn request(prev: u64, entries: &[u64], commit: u64) -> AppendEntriesRequest {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: Some(log_id(prev)),
            entries: entries
                .iter()
                .map(|&i| Entry::new_blank(log_id(i)))
                .collect(),
            leader_commit: Some(log_id(commit)),
        }
    }

    /// A sent request: (prev, entries, commit, deferred), and the follower's answer to give.
    type Sent = (
        (u64, Vec<u64>, u64, bool),
        oneshot::Sender<AppendEntriesResponse>,
    );

    /// A follower the test answers by hand; every request sent lands in the returned queue.
    fn follower() -> (SendAppend, mpsc::UnboundedReceiver<Sent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let tx = Arc::new(Mutex::new(tx));
        let send: SendAppend = Box::new(move |r: AppendEntriesRequest, hold| {
            let (answer, answered) = oneshot::channel();
            let shape = (
                r.prev_log_id.unwrap().index,
                r.entries.iter().map(|e| e.index()).collect(),
                r.leader_commit.unwrap().index,
                hold.is_some(),
            );
            tx.lock().unwrap().send((shape, answer)).unwrap();
            Box::pin(async move { Ok(answered.await.expect("the test answers every request")) })
        });
        (send, rx)
    }

    const HOLD: Duration = Duration::from_millis(1);

    fn matched(
        result: Option<
            <AppendStream<UnboundedReceiverStream<AppendEntriesRequest>> as Stream>::Item,
        >,
    ) -> u64 {
        result.unwrap().unwrap().unwrap().unwrap().index
    }

    #[tokio::test]
    async fn entries_go_one_at_a_time_and_a_notice_between_them_is_deferred() {
        let (send, mut sent) = follower();
        let (input, requests) = mpsc::unbounded_channel();
        let mut stream = AppendStream::new(UnboundedReceiverStream::new(requests), send, HOLD);
        input.send(request(4, &[5], 4)).unwrap();
        input.send(request(5, &[6], 4)).unwrap();
        let answers = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(a) = stream.next().await {
                got.push(matched(Some(a)));
            }
            got
        });
        let (first, answer) = sent.recv().await.unwrap();
        assert_eq!(first, (4, vec![5], 4, false));
        tokio::task::yield_now().await;
        assert!(
            sent.try_recv().is_err(),
            "the second waits for the first's answer"
        );
        answer.send(AppendEntriesResponse::Success).unwrap();
        let (second, answer) = sent.recv().await.unwrap();
        assert_eq!(second, (5, vec![6], 4, false));
        answer.send(AppendEntriesResponse::Success).unwrap();
        // The commit of 6, with no entry to ride on: deferred, and the stream goes on.
        input.send(request(6, &[], 6)).unwrap();
        let (notice, notice_answer) = sent.recv().await.unwrap();
        assert_eq!(notice, (6, vec![], 6, true));
        // The next entries do not wait for the notice's answer.
        input.send(request(6, &[7], 6)).unwrap();
        let (third, answer) = sent.recv().await.unwrap();
        assert_eq!(third, (6, vec![7], 6, false));
        answer.send(AppendEntriesResponse::Success).unwrap();
        notice_answer.send(AppendEntriesResponse::Success).unwrap();
        drop(input);
        assert_eq!(
            answers.await.unwrap(),
            [5, 6, 7, 6],
            "every request is answered"
        );
    }

    #[tokio::test]
    async fn a_notice_the_next_request_covers_is_not_sent() {
        let (send, mut sent) = follower();
        let requests = futures::stream::iter([request(5, &[], 5), request(5, &[6], 5)]);
        let mut stream = AppendStream::new(requests, send, HOLD);
        let answers = tokio::spawn(async move { matched(stream.next().await) });
        let (only, answer) = sent.recv().await.unwrap();
        assert_eq!(only, (5, vec![6], 5, false));
        answer.send(AppendEntriesResponse::Success).unwrap();
        assert_eq!(answers.await.unwrap(), 6);
        assert!(sent.recv().await.is_none(), "the notice was never sent");
    }

    #[tokio::test]
    async fn a_notice_the_next_request_cannot_cover_is_deferred_before_it() {
        let (send, mut sent) = follower();
        // An older commit index cannot carry the notice's newer one.
        let requests = futures::stream::iter([request(5, &[], 5), request(5, &[6], 4)]);
        let stream = AppendStream::new(requests, send, HOLD);
        let answers = tokio::spawn(stream.collect::<Vec<_>>());
        let (notice, a) = sent.recv().await.unwrap();
        assert_eq!(notice, (5, vec![], 5, true));
        a.send(AppendEntriesResponse::Success).unwrap();
        let (entries, a) = sent.recv().await.unwrap();
        assert_eq!(entries, (5, vec![6], 4, false));
        a.send(AppendEntriesResponse::Success).unwrap();
        assert_eq!(answers.await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn the_last_request_of_a_stream_is_never_deferred() {
        // A heartbeat, or the probe that opens a session: one request, then the end.
        let (send, mut sent) = follower();
        let mut stream = AppendStream::new(futures::stream::iter([request(3, &[], 3)]), send, HOLD);
        let answers = tokio::spawn(async move {
            let first = matched(stream.next().await);
            (first, stream.next().await.is_none())
        });
        let (heartbeat, a) = sent.recv().await.unwrap();
        assert_eq!(heartbeat, (3, vec![], 3, false));
        a.send(AppendEntriesResponse::Success).unwrap();
        assert_eq!(answers.await.unwrap(), (3, true));
    }

    #[tokio::test]
    async fn a_conflict_ends_the_session() {
        let (send, mut sent) = follower();
        let requests = futures::stream::iter([request(5, &[6], 5), request(6, &[7], 5)]);
        let stream = AppendStream::new(requests, send, HOLD);
        let answers = tokio::spawn(stream.collect::<Vec<_>>());
        let (_, a) = sent.recv().await.unwrap();
        a.send(AppendEntriesResponse::Conflict).unwrap();
        let answers = answers.await.unwrap();
        assert_eq!(answers.len(), 1);
        assert!(matches!(answers[0], Ok(Err(_))), "{answers:?}");
        assert!(
            sent.recv().await.is_none(),
            "nothing after the conflict was sent"
        );
    }

    #[tokio::test]
    async fn a_zero_hold_sends_every_request_in_turn() {
        let (send, mut sent) = follower();
        let requests = futures::stream::iter([request(5, &[], 5), request(5, &[6], 5)]);
        let stream = AppendStream::new(requests, send, Duration::ZERO);
        let answers = tokio::spawn(stream.collect::<Vec<_>>());
        for expected in [(5, vec![], 5, false), (5, vec![6], 5, false)] {
            let (got, a) = sent.recv().await.unwrap();
            assert_eq!(got, expected);
            a.send(AppendEntriesResponse::Success).unwrap();
        }
        assert_eq!(answers.await.unwrap().len(), 2);
    }
}
