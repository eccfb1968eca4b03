//! [`RedisLimiter`]: GCRA budgets and monthly quotas in Redis, shared by every node.
//!
//! - One round trip per check: a Lua script (`check.lua`, sent by hash with `EVALSHA`, loaded
//!   on `NOSCRIPT`) checks every rate of every budget and every quota and counts the request
//!   against all of them only if all allow it. It reads the Redis server's clock (`TIME`), so
//!   nodes with skewed clocks agree.
//! - Keys: `{prefix}rl:{scope hex}:{subject}:{limit}per{period}` (`100per60s`) holds a rate's TAT in
//!   microseconds and expires at it; `{prefix}quota:{scope hex}:{subject}:{YYYY-MM}` holds a
//!   month's count and expires when the month ends. Idle budgets vanish on their own.
//! - Bounded: every check, including connecting, ends within the limiter's timeout; after a
//!   failure a breaker answers at once for a cooldown (see `breaker.rs`). Whether a request
//!   passes while Redis is unavailable is the caller's decision (`fail_open`).
//! - Standalone Redis (or a primary with replicas) only: the script names quota keys itself
//!   and a request's keys span hash slots, neither of which Redis Cluster allows.

mod breaker;

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, RedisError, Script};

use self::breaker::Breaker;
use super::{Budget, BudgetKey, Decision, Quota, Rate};

#[cfg(test)]
mod tests;

const CALENDAR_LUA: &str = include_str!("calendar.lua");
const CHECK_LUA: &str = include_str!("check.lua");

/// Why a check could not be answered by Redis.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisUnavailable {
    #[error("Redis did not answer within {} ms", timeout.as_millis())]
    Timeout { timeout: Duration },
    #[error("Redis refused the connection: {detail}")]
    ConnectionRefused { detail: String },
    #[error("the connection to Redis failed: {detail}")]
    Connection { detail: String },
    #[error("the rate-limit script failed in Redis: {detail}")]
    Script { detail: String },
    /// Redis failed recently and is left alone for a while (no network was used).
    #[error(
        "Redis is not being asked for another {} ms after it failed: {cause}",
        retry_in.as_millis()
    )]
    BreakerOpen { retry_in: Duration, cause: Arc<str> },
}

impl RedisUnavailable {
    fn from_redis(error: &RedisError, timeout: Duration) -> Self {
        if error.is_connection_refusal() {
            RedisUnavailable::ConnectionRefused {
                detail: error.to_string(),
            }
        } else if error.is_timeout() {
            RedisUnavailable::Timeout { timeout }
        } else if error.is_io_error() || error.is_connection_dropped() {
            RedisUnavailable::Connection {
                detail: error.to_string(),
            }
        } else {
            RedisUnavailable::Script {
                detail: error.to_string(),
            }
        }
    }
}

/// GCRA budgets and monthly quotas counted in Redis, shared by every node using the same Redis
/// and key prefix.
pub struct RedisLimiter {
    client: Client,
    key_prefix: String,
    timeout: Duration,
    script: Script,
    /// The connection checks share (it multiplexes), made by the first check and again after a
    /// failure.
    connection: Mutex<Option<MultiplexedConnection>>,
    /// Held while connecting, so that checks arriving meanwhile wait for that connection instead
    /// of each making one.
    connecting: tokio::sync::Mutex<()>,
    breaker: Breaker,
}

impl fmt::Debug for RedisLimiter {
    /// Leaves the URL out: it may hold a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl RedisLimiter {
    /// A limiter for the Redis at `url` (`redis://[user:password@]host:port[/db]`), prefixing
    /// every key with `key_prefix` and bounding every check by `timeout`. Does not connect: the
    /// first check does, so a node can start while Redis is down.
    pub fn new(url: &str, key_prefix: String, timeout: Duration) -> Result<Self, String> {
        let client = Client::open(url).map_err(|error| format!("invalid Redis URL: {error}"))?;
        if timeout.is_zero() {
            return Err("the Redis timeout must be more than 0".to_owned());
        }
        Ok(RedisLimiter {
            client,
            key_prefix,
            timeout,
            script: Script::new(&format!("{CALENDAR_LUA}\n{CHECK_LUA}")),
            connection: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            breaker: Breaker::new(),
        })
    }

    /// Checks one request against every rate of every budget and every monthly quota, and
    /// counts it against all of them only if all allow it. Takes at most the limiter's timeout;
    /// while the breaker is open, no time at all.
    pub async fn check(
        &self,
        budgets: &[Budget<'_>],
        quotas: &[Quota<'_>],
    ) -> Result<Decision, RedisUnavailable> {
        let quotas: Vec<&Quota<'_>> = quotas.iter().filter(|q| q.per_month > 0).collect();
        let rates: Vec<(&BudgetKey, &Rate)> = budgets
            .iter()
            .flat_map(|budget| budget.rates.iter().map(move |rate| (budget.key, rate)))
            .collect();
        if rates.is_empty() && quotas.is_empty() {
            return Ok(Decision::unlimited());
        }

        let mut invocation = self.script.prepare_invoke();
        for (key, rate) in &rates {
            invocation
                .key(self.rate_key(key, rate))
                .arg(rate.emission_us())
                .arg(rate.tolerance_us());
        }
        for quota in &quotas {
            invocation
                .arg(self.quota_key_stem(quota.key))
                .arg(quota.per_month);
        }

        let pass = self.breaker.pass()?;
        let outcome = tokio::time::timeout(self.timeout, async {
            let mut connection = self.connection().await?;
            invocation.invoke_async::<Vec<i64>>(&mut connection).await
        })
        .await;
        let replies = match outcome {
            Ok(Ok(replies)) => replies,
            Ok(Err(error)) => {
                return Err(self.failed(pass, RedisUnavailable::from_redis(&error, self.timeout)));
            }
            Err(_elapsed) => {
                return Err(self.failed(
                    pass,
                    RedisUnavailable::Timeout {
                        timeout: self.timeout,
                    },
                ));
            }
        };
        let limits: Vec<u64> = rates
            .iter()
            .map(|(_, rate)| rate.capacity())
            .chain(quotas.iter().map(|quota| quota.per_month))
            .collect();
        match decide(&replies, &limits) {
            Ok(decision) => {
                pass.succeeded();
                Ok(decision)
            }
            Err(error) => Err(self.failed(pass, error)),
        }
    }

    /// Runs one command on the limiter's shared connection within its timeout: for other
    /// state the nodes share in Redis (publish idempotency keys). Keys are not prefixed here:
    /// use [`RedisLimiter::key`].
    pub async fn query<T: ::redis::FromRedisValue>(
        &self,
        command: &::redis::Cmd,
    ) -> Result<T, RedisUnavailable> {
        let outcome = tokio::time::timeout(self.timeout, async {
            let mut connection = self.connection().await?;
            command.query_async::<T>(&mut connection).await
        })
        .await;
        let error = match outcome {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => RedisUnavailable::from_redis(&error, self.timeout),
            Err(_elapsed) => RedisUnavailable::Timeout {
                timeout: self.timeout,
            },
        };
        // The next command connects afresh: this connection may be to a Redis that is gone.
        *self.lock_connection() = None;
        Err(error)
    }

    /// `suffix` under the node's key prefix.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.key_prefix)
    }

    /// Records a failure: opens the breaker and drops the connection, so the probe after the
    /// cooldown starts afresh (a connection that timed out may be to a Redis that is gone).
    fn failed(&self, pass: breaker::Pass<'_>, error: RedisUnavailable) -> RedisUnavailable {
        *self.lock_connection() = None;
        if pass.failed(&error) {
            tracing::warn!(
                %error,
                cooldown_ms = breaker::COOLDOWN.as_millis(),
                "rate limits: Redis unavailable; not asked again until the cooldown is over"
            );
        } else {
            tracing::debug!(%error, "rate limits: Redis unavailable");
        }
        error
    }

    async fn connection(&self) -> Result<MultiplexedConnection, RedisError> {
        if let Some(connection) = self.lock_connection().clone() {
            return Ok(connection);
        }
        let _only_one_connects = self.connecting.lock().await;
        if let Some(connection) = self.lock_connection().clone() {
            return Ok(connection);
        }
        // The client's own timeouts match ours; ours (around the whole check) is the bound.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *self.lock_connection() = Some(connection.clone());
        Ok(connection)
    }

    fn lock_connection(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        // Holds an `Option` of a handle: valid after any panic.
        self.connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The rate is named by its limit and period, not its place in the config, so a budget keeps
    /// its state across config changes that reorder rates or change a burst.
    fn rate_key(&self, key: &BudgetKey, rate: &Rate) -> String {
        let period_us = rate.period_us();
        let period = if period_us.is_multiple_of(1_000_000) {
            format!("{}s", period_us / 1_000_000)
        } else {
            format!("{period_us}us")
        };
        format!(
            "{}rl:{}:{}:{}per{period}",
            self.key_prefix,
            hex::encode(key.scope),
            key.subject,
            rate.limit,
        )
    }

    /// The quota key without its month, which the script appends from the server's clock.
    fn quota_key_stem(&self, key: &BudgetKey) -> String {
        format!(
            "{}quota:{}:{}:",
            self.key_prefix,
            hex::encode(key.scope),
            key.subject
        )
    }
}

/// Merges the script's replies (allowed, remaining, reset µs, retry-after µs per limit, in the
/// order sent) into one decision.
fn decide(replies: &[i64], limits: &[u64]) -> Result<Decision, RedisUnavailable> {
    if replies.len() != limits.len() * 4 {
        return Err(RedisUnavailable::Script {
            detail: format!(
                "the script answered {} numbers for {} limits (4 each)",
                replies.len(),
                limits.len()
            ),
        });
    }
    let micros = |value: i64| Duration::from_micros(u64::try_from(value).unwrap_or(0));
    Ok(replies
        .chunks_exact(4)
        .zip(limits)
        .map(|(reply, &limit)| {
            let allowed = reply[0] == 1;
            Decision {
                allowed,
                limit,
                remaining: u64::try_from(reply[1]).unwrap_or(0),
                reset: micros(reply[2]),
                retry_after: (!allowed).then(|| micros(reply[3])),
            }
        })
        .fold(Decision::unlimited(), Decision::merge))
}
