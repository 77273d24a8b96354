//! Redis Sentinel: the master by name from a set of sentinels.
//!
//! Every `interval`, and at once when any sentinel publishes `+switch-master`
//! for the master on its pub/sub, the source asks every sentinel, in
//! parallel and each within `timeout`, for `SENTINEL get-master-addr-by-name`,
//! `SENTINEL master` (for its `config-epoch`) and `SENTINEL replicas`:
//!
//! - a sentinel that is down or does not answer in time is skipped;
//! - fewer answers than a majority of the configured sentinels is
//!   [`Report::Unreachable`] (the cluster keeps its last topology): a lone
//!   sentinel cut off with the old master must not decide alone;
//! - sentinels that disagree are resolved as Sentinel itself resolves them:
//!   the master reported at the highest config epoch wins (a sentinel only
//!   reaches a new epoch by a failover a majority authorised), and at equal
//!   epochs the address most sentinels report.
//!
//! The members are the master and the replicas the winning sentinels list
//! (a killed old master stays listed as a replica of the new one, so its
//! endpoint stays, designated replica, and serves nothing while it probes as
//! a writable master after a restart). Members are named `ip:port`, as
//! Sentinel names them.
//!
//! deadpool-redis's (and redis-rs's) sentinel support is a client that asks
//! the sentinels in turn and connects to the first master address it gets:
//! no replica list, no majority, no pub/sub, so it cannot tell a router who
//! the members are or resolve disagreement; this module uses plain redis-rs
//! connections instead.
//!
//! ```no_run
//! # fn demo() -> Result<(), String> {
//! use std::time::Duration;
//! use switchyard_sources::{SentinelConfig, SentinelSource};
//!
//! let source = SentinelSource::new(SentinelConfig {
//!     sentinels: vec!["redis://10.0.0.1:26379".into(), "redis://10.0.0.2:26379".into(), "redis://10.0.0.3:26379".into()],
//!     master: "cache".into(),
//!     interval: Duration::from_secs(1),
//!     timeout: Duration::from_millis(500),
//! })?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::{join_all, BoxFuture};
use futures_util::StreamExt;
use switchyard_core::Role;
use switchyard_router::source::{Member, Report, TopologySource, View};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::redact;

/// Where the sentinels are and which master to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelConfig {
    /// The sentinels' URLs (`redis://host:26379`, a password in the URL if
    /// they require one; never shown).
    pub sentinels: Vec<String>,
    /// The master's name (`sentinel monitor NAME ...`).
    pub master: String,
    /// How often the sentinels are polled when none pushes a switch.
    pub interval: Duration,
    /// The deadline of each sentinel's answer.
    pub timeout: Duration,
}

/// A [`TopologySource`] that follows Redis Sentinel.
#[derive(Debug)]
pub struct SentinelSource {
    sentinels: Vec<(String, redis::Client)>,
    master: String,
    interval: Duration,
    timeout: Duration,
    /// `+switch-master` notifications from the listeners.
    switched: Option<mpsc::Receiver<String>>,
    /// Stops the listeners when the source is dropped.
    listeners: Option<DropGuard>,
    asked: bool,
}

/// The replies to `get-master-addr-by-name`, `master` and `replicas`.
type Replies = (
    Option<(String, String)>,
    HashMap<String, String>,
    Vec<HashMap<String, String>>,
);

/// One sentinel's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    master: (String, u16),
    epoch: u64,
    replicas: Vec<(String, u16)>,
}

impl SentinelSource {
    /// A source for `config`; fails with a message naming a bad URL.
    pub fn new(config: SentinelConfig) -> Result<Self, String> {
        if config.sentinels.is_empty() {
            return Err("sentinel: no sentinel URL given".into());
        }
        if config.master.is_empty() {
            return Err("sentinel: no master name given".into());
        }
        let sentinels = config
            .sentinels
            .iter()
            .map(|u| {
                redis::Client::open(u.as_str())
                    .map(|c| (redact(u), c))
                    .map_err(|e| format!("sentinel URL {}: {e}", redact(u)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            sentinels,
            master: config.master,
            interval: config.interval,
            timeout: config.timeout,
            switched: None,
            listeners: None,
            asked: false,
        })
    }

    /// Subscribes to `+switch-master` on every sentinel, each in its own task
    /// that reconnects until the source is dropped.
    fn listen(&mut self) {
        let (tx, rx) = mpsc::channel(16);
        let token = CancellationToken::new();
        for (name, client) in &self.sentinels {
            let task = listener(
                name.clone(),
                client.clone(),
                self.master.clone(),
                tx.clone(),
                self.timeout,
            );
            let token = token.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = token.cancelled() => {}
                    () = task => {}
                }
            });
        }
        self.switched = Some(rx);
        self.listeners = Some(token.drop_guard());
    }

    async fn ask(&self, client: &redis::Client) -> Result<Answer, String> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let work = async {
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            let (addr, master, replicas): Replies = redis::pipe()
                .cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&self.master)
                .cmd("SENTINEL")
                .arg("master")
                .arg(&self.master)
                .cmd("SENTINEL")
                .arg("replicas")
                .arg(&self.master)
                .query_async(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>((addr, master, replicas))
        };
        let (addr, master, replicas) = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
            .map_err(|e| e.to_string())?;
        let (ip, port) = addr.ok_or_else(|| format!("does not know master {}", self.master))?;
        let port = port
            .parse()
            .map_err(|_| format!("master port {port:?} is not a number"))?;
        let epoch = master
            .get("config-epoch")
            .and_then(|e| e.parse().ok())
            .unwrap_or(0);
        let replicas = replicas
            .iter()
            .filter_map(|r| Some((r.get("ip")?.clone(), r.get("port")?.parse().ok()?)))
            .collect();
        Ok(Answer {
            master: (ip, port),
            epoch,
            replicas,
        })
    }

    async fn poll(&self) -> Report {
        let answers = join_all(self.sentinels.iter().map(|(_, c)| self.ask(c))).await;
        let mut good = Vec::new();
        let mut errors = Vec::new();
        for ((name, _), answer) in self.sentinels.iter().zip(answers) {
            match answer {
                Ok(a) => good.push(a),
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        if !errors.is_empty() {
            tracing::debug!(errors = ?errors, "some sentinels did not answer");
        }
        match decide(self.sentinels.len(), &good) {
            Some(answer) => Report::View(view_of(answer)),
            None => Report::Unreachable(format!(
                "{} of {} sentinels answered for master {} (a majority is needed){}{}",
                good.len(),
                self.sentinels.len(),
                self.master,
                if errors.is_empty() { "" } else { ": " },
                errors.join("; ")
            )),
        }
    }
}

/// The answer to follow among `answers` from `configured` sentinels: none
/// without a majority answering; else the master at the highest config epoch,
/// then the one most sentinels report.
fn decide(configured: usize, answers: &[Answer]) -> Option<&Answer> {
    if answers.len() * 2 <= configured {
        return None;
    }
    answers.iter().max_by_key(|a| {
        let votes = answers
            .iter()
            .filter(|b| b.epoch == a.epoch && b.master == a.master)
            .count();
        (a.epoch, votes)
    })
}

fn view_of(answer: &Answer) -> View {
    let member = |(ip, port): &(String, u16), role| {
        Member::new(format!("{ip}:{port}"), ip.clone(), *port, role)
    };
    let mut members = vec![member(&answer.master, Role::Primary)];
    for r in &answer.replicas {
        if r != &answer.master && !members.iter().any(|m| m.host == r.0 && m.port == r.1) {
            members.push(member(r, Role::Replica));
        }
    }
    View::new(members)
}

/// Forwards `+switch-master` messages for `master` from one sentinel, reconnecting
/// (after `retry`) whenever the subscription ends.
async fn listener(
    name: String,
    client: redis::Client,
    master: String,
    tx: mpsc::Sender<String>,
    retry: Duration,
) {
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe("+switch-master").await.is_ok() {
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        let payload: String = msg.get_payload().unwrap_or_default();
                        if payload.split(' ').next() == Some(master.as_str())
                            && tx.send(payload).await.is_err()
                        {
                            return;
                        }
                    }
                }
                tracing::debug!(sentinel = %name, "sentinel subscription ended; resubscribing");
            }
            Err(e) => tracing::debug!(sentinel = %name, error = %e, "cannot subscribe to sentinel"),
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(retry).await;
    }
}

impl TopologySource for SentinelSource {
    fn describe(&self) -> String {
        let names: Vec<&str> = self.sentinels.iter().map(|(n, _)| n.as_str()).collect();
        format!("sentinel {} master {}", names.join(","), self.master)
    }

    fn next(&mut self) -> BoxFuture<'_, Report> {
        Box::pin(async move {
            if self.listeners.is_none() {
                self.listen();
            }
            if std::mem::replace(&mut self.asked, true) {
                let interval = self.interval;
                if let Some(rx) = self.switched.as_mut() {
                    tokio::select! {
                        () = tokio::time::sleep(interval) => {}
                        Some(payload) = rx.recv() => {
                            tracing::info!(%payload, "sentinel published +switch-master");
                        }
                    }
                }
            }
            self.poll().await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(port: u16, epoch: u64) -> Answer {
        Answer {
            master: ("127.0.0.1".into(), port),
            epoch,
            replicas: vec![("127.0.0.1".into(), 7001)],
        }
    }

    #[test]
    fn a_minority_decides_nothing() {
        assert_eq!(decide(3, &[answer(1, 0)]), None);
        assert_eq!(decide(2, &[answer(1, 0)]), None);
        assert_eq!(decide(1, &[answer(1, 0)]), Some(&answer(1, 0)));
    }

    #[test]
    fn the_newest_epoch_then_the_majority_wins() {
        let a = [answer(1, 0), answer(1, 0), answer(2, 0)];
        assert_eq!(decide(3, &a).map(|a| a.master.1), Some(1));
        let b = [answer(1, 0), answer(2, 1)];
        assert_eq!(decide(3, &b).map(|a| a.master.1), Some(2));
    }

    #[test]
    fn the_view_names_members_by_address() {
        let mut a = answer(6379, 1);
        a.replicas.push(("127.0.0.1".into(), 6379));
        let view = view_of(&a);
        let names: Vec<&str> = view.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["127.0.0.1:6379", "127.0.0.1:7001"]);
        assert_eq!(view.primary().map(|m| m.port), Some(6379));
    }
}
