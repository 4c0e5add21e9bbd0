//! The `docker` provider: one container per worker, from the locally built worker image,
//! through the Docker Engine API (bollard). Containers carry drover's labels (managed,
//! cluster id, worker id), which is what reconciliation lists.

use super::{Launch, Provider, ProviderConfig, ProviderError, Resource};
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use std::collections::HashMap;
use std::time::Duration;

const MANAGED: &str = "drover.managed";
const CLUSTER: &str = "drover.cluster";
const WORKER: &str = "drover.worker";
const PROVIDER: &str = "drover.provider";
/// Seconds between SIGTERM and SIGKILL when a worker container stops.
const STOP_GRACE_SECS: i32 = 10;

pub(super) struct DockerProvider {
    docker: Docker,
    image: String,
    network: String,
    cluster_id: String,
}

impl DockerProvider {
    /// Connects to the local engine and checks that it answers and has the worker image.
    pub async fn connect(config: &ProviderConfig, cluster_id: &str) -> Result<Self, ProviderError> {
        let docker = Docker::connect_with_local_defaults()?
            .negotiate_version()
            .await?;
        docker.ping().await?;
        if docker.inspect_image(&config.image).await.is_err() {
            return Err(ProviderError::NotStarted(format!(
                "the worker image {} is not on this Docker engine; build it with \
                 scripts/build-images --worker PATH_TO_DROVER",
                config.image
            )));
        }
        Ok(Self {
            docker,
            image: config.image.clone(),
            network: config.network.clone(),
            cluster_id: cluster_id.to_string(),
        })
    }
}

fn is_gone(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

#[async_trait::async_trait]
impl Provider for DockerProvider {
    async fn create(&self, launch: &Launch) -> Result<String, ProviderError> {
        let labels = HashMap::from([
            (MANAGED.to_string(), "true".to_string()),
            (CLUSTER.to_string(), self.cluster_id.clone()),
            (WORKER.to_string(), launch.worker_id.to_string()),
            (PROVIDER.to_string(), "docker".to_string()),
        ]);
        let body = ContainerCreateBody {
            image: Some(self.image.clone()),
            cmd: Some(
                std::iter::once("/bin/drover".to_string())
                    .chain(launch.worker_args("/var/lib/drover/worker"))
                    .collect(),
            ),
            env: Some(vec![
                format!("DROVER_SERVER={}", launch.server_url),
                format!("DROVER_TOKEN={}", launch.token),
                "RUST_LOG=info".into(),
            ]),
            labels: Some(labels),
            host_config: Some(HostConfig {
                network_mode: Some(self.network.clone()),
                // A worker that gives up (no control plane for too long) leaves no container.
                auto_remove: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = format!("drover-worker-{}", launch.worker_id);
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = self.docker.create_container(Some(options), body).await?;
        if let Err(e) = self
            .docker
            .start_container(
                &created.id,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
        {
            // Nothing half-made stays behind.
            let _ = self.destroy(&created.id).await;
            return Err(ProviderError::NotStarted(e.to_string()));
        }
        Ok(created.id)
    }

    async fn destroy(&self, resource_id: &str) -> Result<(), ProviderError> {
        let stop = StopContainerOptionsBuilder::new()
            .t(STOP_GRACE_SECS)
            .build();
        match self.docker.stop_container(resource_id, Some(stop)).await {
            Ok(()) => {}
            Err(e) if is_gone(&e) => return Ok(()),
            // 304: already stopped; anything else, removal with force still kills it.
            Err(_) => {}
        }
        let remove = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match self
            .docker
            .remove_container(resource_id, Some(remove))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_gone(&e) => Ok(()),
            // Workers run with auto-remove: the engine may be removing it already (409).
            // Gone is what was asked; wait for it, bounded.
            Err(e) => {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while std::time::Instant::now() < deadline {
                    match self
                        .docker
                        .inspect_container(
                            resource_id,
                            None::<bollard::query_parameters::InspectContainerOptions>,
                        )
                        .await
                    {
                        Err(gone) if is_gone(&gone) => return Ok(()),
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                Err(e.into())
            }
        }
    }

    async fn list(&self) -> Result<Vec<Resource>, ProviderError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{CLUSTER}={}", self.cluster_id)],
        )]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self.docker.list_containers(Some(options)).await?;
        Ok(containers
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                if labels.get(MANAGED).map(String::as_str) != Some("true") {
                    return None;
                }
                Some(Resource {
                    id: c.id?,
                    worker_id: labels.get(WORKER).and_then(|w| w.parse().ok()),
                })
            })
            .collect())
    }
}
