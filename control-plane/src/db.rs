//! The registry database: connecting, and applying `registry-migrations/`.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

/// The migrations in `registry-migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../registry-migrations");

/// Connects to the registry database, failing within `timeout` when it cannot.
pub async fn connect(url: &str, timeout: Duration) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(timeout)
        .connect(url)
        .await
}

/// Applies every migration not yet applied. Refuses a database migrated by a newer build.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
