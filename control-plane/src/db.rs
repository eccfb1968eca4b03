//! The registry database: connecting, and applying `registry-migrations/`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

/// The migrations in `registry-migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../registry-migrations");

/// How long the control plane waits on its database.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For a connection from the pool (a new one is opened within it too).
    pub acquire: Duration,
    /// For each statement and for each lock a statement waits on: Postgres itself ends the
    /// statement past it, so a query stuck behind a lock or a plan gone wrong cannot hold a
    /// request for ever. A transaction left idle is ended after [`IDLE_IN_TRANSACTION`] or
    /// this, whichever is longer (a large apply validates in between its statements), so a
    /// commit that hangs cannot hold the registry head's row lock for ever either.
    pub statement: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            acquire: Duration::from_secs(10),
            statement: Duration::from_secs(30),
        }
    }
}

/// The least time a transaction may sit idle before Postgres ends its session.
pub const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(300);

/// Connects to the registry database, failing within `timeouts.acquire` when it cannot.
pub async fn connect(url: &str, timeouts: Timeouts) -> Result<PgPool, sqlx::Error> {
    let millis = |d: Duration| d.as_millis().max(1).to_string();
    let statement = millis(timeouts.statement);
    let idle = millis(timeouts.statement.max(IDLE_IN_TRANSACTION));
    let options = PgConnectOptions::from_str(url)?.options([
        ("statement_timeout", statement.as_str()),
        ("lock_timeout", statement.as_str()),
        ("idle_in_transaction_session_timeout", idle.as_str()),
    ]);
    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(timeouts.acquire)
        .connect_with(options)
        .await
}

/// Applies every migration not yet applied. Refuses a database migrated by a newer build.
///
/// Runs on a connection of its own without the timeouts: a migration of a large registry may
/// rightly take longer than any request should, and a replica starting beside another waits
/// for the other's migrations (Postgres applies the last `-c` given for a setting).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let options = pool.connect_options().as_ref().clone().options([
        ("statement_timeout", "0"),
        ("lock_timeout", "0"),
        ("idle_in_transaction_session_timeout", "0"),
    ]);
    let mut connection = options.connect().await?;
    let result = MIGRATOR.run(&mut connection).await;
    // Closing is a courtesy to the server; the migration's outcome is what matters.
    let _ = sqlx::Connection::close(connection).await;
    result
}
