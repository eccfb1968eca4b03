//! A fresh Postgres database per test.

use std::time::Duration;

use anyhow::Context;
use sqlx::{Connection, PgConnection};

use crate::{START_SERVICES_HINT, database_url, unique_name};

/// A database created for one test and dropped (with its connections) when it ends.
#[derive(Debug)]
pub struct TestDatabase {
    pub name: String,
    /// URL of the new database.
    pub url: String,
    admin_url: String,
}

impl TestDatabase {
    pub async fn create() -> anyhow::Result<Self> {
        let admin_url = database_url();
        let name = unique_name("sluice_test");
        let mut admin = connect(&admin_url).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .with_context(|| format!("cannot create database {name}"))?;
        let url = with_database(&admin_url, &name)?;
        Ok(Self {
            name,
            url,
            admin_url,
        })
    }

    /// A connection to this test's database.
    pub async fn connect(&self) -> anyhow::Result<PgConnection> {
        connect(&self.url).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        crate::clean_up(format!("test database {name}"), move || async move {
            let mut admin = connect(&admin_url).await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut admin)
                .await?;
            Ok(())
        });
    }
}

async fn connect(url: &str) -> anyhow::Result<PgConnection> {
    tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(url))
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| format!("cannot connect to Postgres at {url}; {START_SERVICES_HINT}"))
}

/// `url` with its database name replaced.
fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let mut parsed = url::Url::parse(url).with_context(|| format!("bad database URL {url}"))?;
    parsed.set_path(&format!("/{database}"));
    Ok(parsed.into())
}
