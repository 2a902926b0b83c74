//! What the main thread answers on the HTTP endpoint ([`crate::endpoint`]):
//! the metrics, herd's status document, and the two probes.
//!
//! - `/livez` is 200 when herd's loops turn: the main thread answers it
//!   only after the hand-off loop has answered a ping, within
//!   [`LIVENESS_TIMEOUT`]. A wedged loop fails it; nothing else does (a
//!   liveness probe that fails on load or on bad workers would make the
//!   orchestrator kill a herd that is doing its job).
//! - `/readyz` is 200 when at least `ready_min` slots have a ready worker
//!   and herd is not stopping (nor waiting out `shutdown_delay`); else 503
//!   with the one-line reason ([`readiness`], pure).
//! - `/status` is `herd status --json`'s document.

use hyper::StatusCode;

use super::*;
use crate::endpoint::{Answer, Asked, Query};
use crate::status::SlotState;

/// How long `/livez` waits for the hand-off loop. It answers a ping within
/// one turn (a turn's budget is bounded), so a second means it is stuck.
pub const LIVENESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

impl Primary {
    /// Answers one query; `/livez` later, once the hand-off loop answered.
    pub(super) fn answer(&mut self, asked: Asked) {
        let Asked { query, reply } = asked;
        let answer = match query {
            Query::Metrics => Answer {
                status: StatusCode::OK,
                content_type: prometheus::TEXT_FORMAT,
                body: self.render_metrics(),
            },
            Query::Status => {
                self.handoff.tally(handoff::TALLY_WAIT);
                let report = status_report(
                    &self.supervisor,
                    &self.counters,
                    self.started,
                    &self.upgrading.record,
                );
                Answer {
                    status: StatusCode::OK,
                    content_type: "application/json",
                    body: serde_json::to_vec_pretty(&report).unwrap_or_default(),
                }
            }
            Query::Ready => {
                let ready = self.ready_slots();
                let wanted = self.supervisor.settings().ready_min;
                readiness(ready, wanted, self.leaving())
            }
            Query::Live => return self.answer_live(reply),
        };
        let _ = reply.send(answer);
    }

    fn render_metrics(&self) -> Vec<u8> {
        self.handoff.tally(handoff::TALLY_WAIT);
        let counters = &self.counters;
        let slots = self
            .supervisor
            .status(|slot| counters.handed_off[slot].load(Relaxed));
        let cpu = self.supervisor.cpu_seconds();
        self.metrics.render(counters, &slots, &cpu)
    }

    /// Slots whose worker serves (ready, or ready while replaced).
    fn ready_slots(&self) -> usize {
        let slots = self.supervisor.status(|_| 0);
        slots
            .iter()
            .filter(|slot| matches!(slot.state, SlotState::Ready | SlotState::Replacing))
            .count()
    }

    /// Pings the hand-off loop; the probe is answered when it pongs, or
    /// failed after [`LIVENESS_TIMEOUT`].
    fn answer_live(&self, reply: tokio::sync::oneshot::Sender<Answer>) {
        let (ping, pong) = oneshot::channel();
        let sent = self.handoff.send(Command::Ping(ping)).is_ok();
        tokio::spawn(async move {
            let answered = sent
                && matches!(
                    tokio::time::timeout(LIVENESS_TIMEOUT, pong).await,
                    Ok(Ok(()))
                );
            let _ = reply.send(liveness(answered));
        });
    }
}

/// `/livez`'s answer: whether the hand-off loop answered in time.
fn liveness(answered: bool) -> Answer {
    if answered {
        Answer::text(StatusCode::OK, "live")
    } else {
        Answer::text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not live: the hand-off loop did not answer within {LIVENESS_TIMEOUT:?}"),
        )
    }
}

/// `/readyz`'s answer: `ready` slots with a serving worker, `wanted` of
/// them needed (`ready_min`), and why herd is leaving, if it is.
pub fn readiness(ready: usize, wanted: usize, leaving: Option<&str>) -> Answer {
    match leaving {
        Some(why) => Answer::text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
        None if ready >= wanted => Answer::text(
            StatusCode::OK,
            format!("ready: {ready} worker(s) ready (ready_min {wanted})"),
        ),
        None => Answer::text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {ready} worker(s) ready, ready_min is {wanted}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn says(answer: &Answer) -> (u16, String) {
        let text = String::from_utf8(answer.body.clone()).unwrap();
        assert!(
            text.ends_with('\n') && text.lines().count() == 1,
            "{text:?}"
        );
        (answer.status.as_u16(), text)
    }

    #[test]
    fn ready_needs_ready_min_workers_and_no_stop() {
        for ready in 0..4 {
            for wanted in 1..4 {
                for leaving in [
                    None,
                    Some("stopping"),
                    Some("stopping after shutdown_delay"),
                ] {
                    let (code, text) = says(&readiness(ready, wanted, leaving));
                    let expect = if leaving.is_none() && ready >= wanted {
                        200
                    } else {
                        503
                    };
                    assert_eq!(code, expect, "{ready} {wanted} {leaving:?}: {text}");
                    if let Some(why) = leaving {
                        assert_eq!(text, format!("not ready: {why}\n"));
                    }
                }
            }
        }
        assert_eq!(
            says(&readiness(1, 2, None)).1,
            "not ready: 1 worker(s) ready, ready_min is 2\n"
        );
    }

    #[test]
    fn live_is_the_hand_off_loop_answering() {
        assert_eq!(says(&liveness(true)), (200, "live\n".to_string()));
        let (code, text) = says(&liveness(false));
        assert_eq!(code, 503);
        assert!(text.contains("did not answer within 1s"), "{text}");
    }
}
