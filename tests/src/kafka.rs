//! A Kafka topic per test, and clients configured the way Sluice produces.

use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};

use crate::{START_SERVICES_HINT, kafka_bootstrap, unique_name};

/// Every Kafka call the harness makes gives up after this long.
pub const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// A topic created for one test and deleted when it ends.
#[derive(Debug)]
pub struct TestTopic {
    pub name: String,
    pub partitions: i32,
    bootstrap: String,
}

impl TestTopic {
    pub async fn create(partitions: i32) -> anyhow::Result<Self> {
        let bootstrap = kafka_bootstrap();
        let name = unique_name("sluice-test").replace('_', "-");
        let admin = admin(&bootstrap)?;
        let topic = NewTopic::new(&name, partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new()
            .operation_timeout(Some(KAFKA_TIMEOUT))
            .request_timeout(Some(KAFKA_TIMEOUT));
        let results = tokio::time::timeout(KAFKA_TIMEOUT, admin.create_topics([&topic], &options))
            .await
            .with_context(|| format!("creating topic {name} timed out; {START_SERVICES_HINT}"))?
            .with_context(|| {
                format!("cannot create topic {name} at {bootstrap}; {START_SERVICES_HINT}")
            })?;
        for result in results {
            if let Err((topic, code)) = result {
                bail!("cannot create topic {topic}: {code}");
            }
        }
        Ok(Self {
            name,
            partitions,
            bootstrap,
        })
    }

    /// A producer as Sluice configures one: idempotent, `acks=all`.
    pub fn producer(&self) -> anyhow::Result<FutureProducer> {
        client_config(&self.bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", KAFKA_TIMEOUT.as_millis().to_string())
            .create()
            .context("cannot create a Kafka producer")
    }

    /// A consumer assigned every partition of the topic from the beginning (no consumer
    /// group coordination).
    pub fn consumer_from_beginning(&self) -> anyhow::Result<StreamConsumer> {
        let consumer: StreamConsumer = client_config(&self.bootstrap)
            .set("group.id", unique_name("sluice-test-reader"))
            .set("enable.auto.commit", "false")
            .create()
            .context("cannot create a Kafka consumer")?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..self.partitions {
            assignment.add_partition_offset(&self.name, partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        Ok(consumer)
    }
}

impl Drop for TestTopic {
    fn drop(&mut self) {
        let (bootstrap, name) = (self.bootstrap.clone(), self.name.clone());
        crate::clean_up(format!("topic {name}"), move || async move {
            let admin = admin(&bootstrap)?;
            let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
            tokio::time::timeout(
                Duration::from_secs(10),
                admin.delete_topics(&[&name], &options),
            )
            .await??;
            Ok(())
        });
    }
}

/// A client of the broker at `bootstrap`, configured as every test client is.
pub fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("socket.timeout.ms", "10000")
        .set("broker.address.family", "v4");
    config
}

fn admin(bootstrap: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    client_config(bootstrap)
        .create()
        .context("cannot create a Kafka admin client")
}
