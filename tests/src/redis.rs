//! A Redis key prefix per test.

use std::time::Duration;

use anyhow::Context;
use redis::AsyncCommands;

use crate::{START_SERVICES_HINT, redis_url, unique_name};

/// A unique key prefix; every key under it is deleted when the test ends.
#[derive(Debug)]
pub struct TestRedis {
    /// Ends in `:`; pass it to the code under test as its key prefix.
    pub prefix: String,
    client: redis::Client,
}

impl TestRedis {
    pub async fn create() -> anyhow::Result<Self> {
        let client = redis::Client::open(redis_url())?;
        let this = Self {
            prefix: format!("{}:", unique_name("sluice_test")),
            client,
        };
        let mut connection = this.connection().await?;
        let pong: String = redis::cmd("PING").query_async(&mut connection).await?;
        anyhow::ensure!(pong == "PONG", "Redis answered PING with {pong:?}");
        Ok(this)
    }

    /// `prefix` + `key`.
    pub fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub async fn connection(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        tokio::time::timeout(
            Duration::from_secs(5),
            self.client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| {
            format!(
                "cannot connect to Redis at {}; {START_SERVICES_HINT}",
                redis_url()
            )
        })
    }

    /// Keys under the prefix.
    pub async fn keys(&self) -> anyhow::Result<Vec<String>> {
        let mut connection = self.connection().await?;
        let mut keys: Vec<String> = Vec::new();
        let mut iter: redis::AsyncIter<String> =
            connection.scan_match(format!("{}*", self.prefix)).await?;
        while let Some(key) = iter.next_item().await {
            keys.push(key?);
        }
        Ok(keys)
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let client = self.client.clone();
        let prefix = self.prefix.clone();
        let cleaned = std::thread::spawn(move || {
            let mut connection = client.get_connection_with_timeout(Duration::from_secs(5))?;
            let keys: Vec<String> =
                redis::Commands::scan_match(&mut connection, format!("{prefix}*"))?
                    .collect::<Result<_, _>>()?;
            if !keys.is_empty() {
                redis::Commands::del::<_, ()>(&mut connection, keys)?;
            }
            anyhow::Ok(())
        })
        .join();
        if let Ok(Err(e)) = cleaned {
            eprintln!(
                "warning: could not delete Redis keys under {}: {e:#}",
                self.prefix
            );
        }
    }
}
