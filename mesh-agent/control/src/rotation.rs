//! The CA rotation as a state machine: pure, so every phase and refusal is
//! unit-tested without sockets; [`certs::Authority`](super::certs) holds
//! it, feeds it what it observes and carries out the [`Effect`]s.
//!
//! ```text
//! Idle --rotate--> BundleDistributed --every connected agent ACKed a bundle with the new root-->
//!   Signing (new certificates from the new CA; old root still trusted; optional forced renewal)
//!   --no live certificate chains to the old root (or `retire`)--> Retiring (old root removed:
//!   Promote) --every connected agent ACKed the bundle without it--> Idle
//! rollback: BundleDistributed --> Idle (DropNext);
//!           Signing --> RollingBack (old CA signs again, forced renewal)
//!                   --no live certificate on the new root--> Idle (DropNext)
//! ```
//!
//! Nothing moves on its own while paused; `retire` and `rollback` still do.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Idle,
    BundleDistributed,
    Signing,
    Retiring,
    RollingBack,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "Idle",
            Phase::BundleDistributed => "BundleDistributed",
            Phase::Signing => "Signing",
            Phase::Retiring => "Retiring",
            Phase::RollingBack => "RollingBack",
        }
    }

    /// For the phase gauge: 0 Idle .. 4 RollingBack.
    pub fn number(self) -> i64 {
        match self {
            Phase::Idle => 0,
            Phase::BundleDistributed => 1,
            Phase::Signing => 2,
            Phase::Retiring => 3,
            Phase::RollingBack => 4,
        }
    }
}

/// Which roots agents trust and which CA signs, per phase. `current` is
/// the CA in service before the rotation, `next` the one it brings in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trust {
    pub current: bool,
    pub next: bool,
    pub signer: Slot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Current,
    Next,
}

/// The persisted state of a rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    pub phase: Phase,
    pub paused: bool,
    /// Asked with the rotation: once signing switches, agents renew at once.
    pub force_renew: bool,
    pub since_unix: u64,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            phase: Phase::Idle,
            paused: false,
            force_renew: false,
            since_unix: 0,
        }
    }
}

/// What the authority sees when it asks the machine to move on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observed {
    /// Every connected agent acknowledged the bundle of the current phase.
    pub agents_acked: bool,
    /// Live certificates (unexpired, newest of their identity and node)
    /// under the current and the next root.
    pub live_current: usize,
    pub live_next: usize,
}

/// What the authority must do after a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The next CA becomes the current one; the old one is gone for good.
    Promote,
    /// The next CA is thrown away.
    DropNext,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("a rotation is already running (phase {0}); roll it back or let it finish first")]
    Running(&'static str),
    #[error("no rotation is running")]
    NotRunning,
    #[error("the old root is already retired (phase Retiring): a rollback is no longer possible")]
    AlreadyRetired,
    #[error("already rolling back")]
    AlreadyRollingBack,
    #[error("cannot retire the old root in phase {0}: signing has not switched to the new CA")]
    NotSigning(&'static str),
    #[error(
        "cannot retire the old root: it still signs {0} live certificate(s); wait for their renewal or rotate with --force-renew"
    )]
    StillSigns(usize),
    #[error("unknown action {0:?} (expected pause, resume, rollback or retire)")]
    UnknownAction(String),
}

impl Rotation {
    pub fn trust(&self) -> Trust {
        let (current, next, signer) = match self.phase {
            Phase::Idle | Phase::Retiring => (true, false, Slot::Current),
            Phase::BundleDistributed | Phase::RollingBack => (true, true, Slot::Current),
            Phase::Signing => (true, true, Slot::Next),
        };
        Trust {
            current,
            next,
            signer,
        }
    }

    /// Whether agents are asked to renew everything not of the signer now.
    pub fn force_renew_now(&self) -> bool {
        match self.phase {
            Phase::Signing => self.force_renew,
            Phase::RollingBack => true,
            _ => false,
        }
    }

    fn enter(&mut self, phase: Phase, now: u64) {
        self.phase = phase;
        self.since_unix = now;
    }

    /// A new rotation; the authority has checked and stored the next CA.
    pub fn start(&mut self, force_renew: bool, now: u64) -> Result<(), Refused> {
        if self.phase != Phase::Idle {
            return Err(Refused::Running(self.phase.as_str()));
        }
        self.paused = false;
        self.force_renew = force_renew;
        self.enter(Phase::BundleDistributed, now);
        Ok(())
    }

    pub fn pause(&mut self) -> Result<(), Refused> {
        if self.phase == Phase::Idle {
            return Err(Refused::NotRunning);
        }
        self.paused = true;
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), Refused> {
        if self.phase == Phase::Idle {
            return Err(Refused::NotRunning);
        }
        self.paused = false;
        Ok(())
    }

    pub fn rollback(&mut self, now: u64) -> Result<Option<Effect>, Refused> {
        match self.phase {
            Phase::Idle => Err(Refused::NotRunning),
            Phase::Retiring => Err(Refused::AlreadyRetired),
            Phase::RollingBack => Err(Refused::AlreadyRollingBack),
            Phase::BundleDistributed => {
                self.paused = false;
                self.enter(Phase::Idle, now);
                Ok(Some(Effect::DropNext))
            }
            Phase::Signing => {
                self.paused = false;
                self.enter(Phase::RollingBack, now);
                Ok(None)
            }
        }
    }

    /// The operator's retire: only from Signing, and only when nothing
    /// live chains to the old root.
    pub fn retire(&mut self, seen: Observed, now: u64) -> Result<Effect, Refused> {
        if self.phase != Phase::Signing {
            return Err(Refused::NotSigning(self.phase.as_str()));
        }
        if seen.live_current > 0 {
            return Err(Refused::StillSigns(seen.live_current));
        }
        self.enter(Phase::Retiring, now);
        Ok(Effect::Promote)
    }

    /// Moves on when what the phase waits for has happened (and the
    /// rotation is not paused); returns whether it moved and what to do.
    pub fn tick(&mut self, seen: Observed, now: u64) -> Option<Option<Effect>> {
        if self.paused {
            return None;
        }
        match self.phase {
            Phase::Idle => None,
            Phase::BundleDistributed if seen.agents_acked => {
                self.enter(Phase::Signing, now);
                Some(None)
            }
            Phase::Signing if seen.live_current == 0 => {
                self.enter(Phase::Retiring, now);
                Some(Some(Effect::Promote))
            }
            Phase::Retiring if seen.agents_acked => {
                self.enter(Phase::Idle, now);
                Some(None)
            }
            Phase::RollingBack if seen.live_next == 0 => {
                self.enter(Phase::Idle, now);
                Some(Some(Effect::DropNext))
            }
            _ => None,
        }
    }

    /// What the phase waits for, for `meshctl ca status`.
    pub fn waiting_for(&self) -> &'static str {
        if self.paused {
            return "paused: meshctl ca resume (or rollback)";
        }
        match self.phase {
            Phase::Idle => "nothing",
            Phase::BundleDistributed => {
                "every connected agent, and every disconnected one whose node holds live certificates, to acknowledge the bundle with the new root"
            }
            Phase::Signing => "no live certificate under the old root (renewals at half-life)",
            Phase::Retiring => {
                "every connected agent to acknowledge the bundle without the old root"
            }
            Phase::RollingBack => "no live certificate under the new root (forced renewal)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACKED: Observed = Observed {
        agents_acked: true,
        live_current: 0,
        live_next: 0,
    };

    fn seen(agents_acked: bool, live_current: usize, live_next: usize) -> Observed {
        Observed {
            agents_acked,
            live_current,
            live_next,
        }
    }

    #[test]
    fn a_full_rotation_waits_for_acks_then_for_the_old_roots_certificates() {
        let mut r = Rotation::default();
        assert_eq!(
            r.trust(),
            Trust {
                current: true,
                next: false,
                signer: Slot::Current
            }
        );
        r.start(false, 10).expect("idle");
        assert_eq!(r.phase, Phase::BundleDistributed);
        assert_eq!(
            r.trust(),
            Trust {
                current: true,
                next: true,
                signer: Slot::Current
            }
        );
        assert_eq!(
            r.tick(seen(false, 3, 0), 11),
            None,
            "an agent has not acked"
        );
        assert_eq!(r.tick(seen(true, 3, 0), 12), Some(None));
        assert_eq!(r.phase, Phase::Signing);
        assert_eq!(
            r.trust(),
            Trust {
                current: true,
                next: true,
                signer: Slot::Next
            }
        );
        assert!(!r.force_renew_now());
        assert_eq!(r.tick(seen(true, 2, 1), 13), None, "old certificates live");
        assert_eq!(r.tick(seen(true, 0, 3), 14), Some(Some(Effect::Promote)));
        assert_eq!(r.phase, Phase::Retiring);
        // Promoted: the new CA is "current" now, alone.
        assert_eq!(
            r.trust(),
            Trust {
                current: true,
                next: false,
                signer: Slot::Current
            }
        );
        assert_eq!(r.tick(seen(false, 3, 0), 15), None);
        assert_eq!(r.tick(seen(true, 3, 0), 16), Some(None));
        assert_eq!((r.phase, r.since_unix), (Phase::Idle, 16));
    }

    #[test]
    fn a_second_rotation_is_refused_while_one_runs() {
        let mut r = Rotation::default();
        r.start(false, 1).expect("idle");
        let err = r.start(false, 2).expect_err("running");
        assert_eq!(err, Refused::Running("BundleDistributed"));
        assert!(err.to_string().contains("already running"));
    }

    #[test]
    fn paused_nothing_moves_until_resumed() {
        let mut r = Rotation::default();
        assert_eq!(r.pause(), Err(Refused::NotRunning));
        r.start(false, 1).expect("idle");
        r.pause().expect("running");
        assert_eq!(r.tick(ACKED, 2), None);
        assert_eq!(r.phase, Phase::BundleDistributed);
        r.resume().expect("running");
        assert_eq!(r.tick(ACKED, 3), Some(None));
        assert_eq!(r.phase, Phase::Signing);
    }

    #[test]
    fn rollback_from_each_phase_until_the_old_root_is_retired() {
        let mut r = Rotation::default();
        assert_eq!(r.rollback(0), Err(Refused::NotRunning));
        // From BundleDistributed: nothing was signed by the new CA.
        r.start(false, 1).expect("idle");
        r.pause().expect("running");
        assert_eq!(r.rollback(2), Ok(Some(Effect::DropNext)));
        assert_eq!((r.phase, r.paused), (Phase::Idle, false));
        // From Signing: the old CA signs again, everyone renews, and the
        // new root stays trusted until nothing live chains to it.
        r.start(false, 3).expect("idle");
        r.tick(ACKED, 4);
        assert_eq!(r.phase, Phase::Signing);
        assert_eq!(r.rollback(5), Ok(None));
        assert_eq!(r.phase, Phase::RollingBack);
        assert_eq!(
            r.trust(),
            Trust {
                current: true,
                next: true,
                signer: Slot::Current
            }
        );
        assert!(r.force_renew_now());
        assert_eq!(r.rollback(6), Err(Refused::AlreadyRollingBack));
        assert_eq!(r.tick(seen(true, 1, 2), 7), None);
        assert_eq!(r.tick(seen(true, 3, 0), 8), Some(Some(Effect::DropNext)));
        assert_eq!(r.phase, Phase::Idle);
        // From Retiring: too late.
        r.start(false, 9).expect("idle");
        r.tick(ACKED, 10);
        r.tick(ACKED, 11);
        assert_eq!(r.phase, Phase::Retiring);
        assert_eq!(r.rollback(12), Err(Refused::AlreadyRetired));
    }

    #[test]
    fn retiring_a_root_that_still_signs_live_certificates_is_refused() {
        let mut r = Rotation::default();
        r.start(true, 1).expect("idle");
        assert_eq!(
            r.retire(ACKED, 2),
            Err(Refused::NotSigning("BundleDistributed"))
        );
        r.pause().expect("running");
        r.resume().expect("running");
        r.tick(ACKED, 3);
        assert!(r.force_renew_now(), "asked with the rotation");
        r.pause().expect("running");
        let err = r.retire(seen(true, 2, 1), 4).expect_err("live");
        assert_eq!(err, Refused::StillSigns(2));
        assert!(err.to_string().contains("2 live certificate"), "{err}");
        // Paused, an explicit retire still goes when nothing is live.
        assert_eq!(r.retire(seen(true, 0, 3), 5), Ok(Effect::Promote));
        assert_eq!(r.phase, Phase::Retiring);
    }
}
