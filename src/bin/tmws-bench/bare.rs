//! The floor for a cheap call: a bare tonic server (no layers, no database) that answers
//! GetMemory with a canned memory of the same size as the service's answer, and the standard
//! health service, on loopback.

use std::net::SocketAddr;

use tmws::pb::{
    BatchCreateMemoriesRequest, BatchCreateMemoriesResponse, CreateMemoryRequest, DeleteMemoryRequest,
    DeleteMemoryResponse, GetMemoryRequest, GetMemoryStatsRequest, ListMemoriesRequest, ListMemoriesResponse, Memory,
    MemoryStats, PruneMemoriesRequest, PruneMemoriesResponse, SearchMemoriesRequest, SearchMemoriesResponse,
    ShareMemoryRequest, UpdateMemoryRequest,
    memory_service_server::{MemoryService, MemoryServiceServer},
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

struct Bare {
    memory: Memory,
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl MemoryService for Bare {
    async fn create_memory(&self, _: Request<CreateMemoryRequest>) -> R<Memory> {
        Err(Status::unimplemented("bare"))
    }
    async fn batch_create_memories(&self, _: Request<BatchCreateMemoriesRequest>) -> R<BatchCreateMemoriesResponse> {
        Err(Status::unimplemented("bare"))
    }
    async fn get_memory(&self, _: Request<GetMemoryRequest>) -> R<Memory> {
        Ok(Response::new(self.memory.clone()))
    }
    async fn update_memory(&self, _: Request<UpdateMemoryRequest>) -> R<Memory> {
        Err(Status::unimplemented("bare"))
    }
    async fn delete_memory(&self, _: Request<DeleteMemoryRequest>) -> R<DeleteMemoryResponse> {
        Err(Status::unimplemented("bare"))
    }
    async fn list_memories(&self, _: Request<ListMemoriesRequest>) -> R<ListMemoriesResponse> {
        Err(Status::unimplemented("bare"))
    }
    async fn search_memories(&self, _: Request<SearchMemoriesRequest>) -> R<SearchMemoriesResponse> {
        Err(Status::unimplemented("bare"))
    }
    async fn share_memory(&self, _: Request<ShareMemoryRequest>) -> R<Memory> {
        Err(Status::unimplemented("bare"))
    }
    async fn prune_memories(&self, _: Request<PruneMemoriesRequest>) -> R<PruneMemoriesResponse> {
        Err(Status::unimplemented("bare"))
    }
    async fn get_memory_stats(&self, _: Request<GetMemoryStatsRequest>) -> R<MemoryStats> {
        Err(Status::unimplemented("bare"))
    }
}

/// Starts the bare server on 127.0.0.1 (a free port) on its own threads and tokio runtime (as
/// many workers as the machine has CPUs, like a server process), so it does not share a
/// scheduler with the load generator. Returns its address.
pub async fn start(memory: Memory) -> anyhow::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    std::thread::Builder::new().name("bare-server".into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("bare-worker").build()
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("tmws-bench: bare server runtime: {e}");
                return;
            }
        };
        runtime.block_on(async move {
            let listener = match TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("tmws-bench: bare server listener: {e}");
                    return;
                }
            };
            let (reporter, health) = tonic_health::server::health_reporter();
            reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            let result = tonic::transport::Server::builder()
                .add_service(health)
                .add_service(MemoryServiceServer::new(Bare { memory }))
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = result {
                eprintln!("tmws-bench: bare server stopped: {e}");
            }
        });
    })?;
    Ok(addr)
}
