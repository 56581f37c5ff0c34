//! gRPC adapter for `tmws.v1.MemoryService`.
//!
//! Each method validates its request, takes the caller's principal and calls the memory domain.
//! Methods whose implementation has not landed answer UNIMPLEMENTED (never a fake success).

use tonic::{Request, Response, Status};

use super::not_yet;
use crate::pb::{self, memory_service_server::MemoryService};

#[derive(Debug, Clone, Default)]
pub struct MemoryApi {}

#[tonic::async_trait]
impl MemoryService for MemoryApi {
    async fn create_memory(&self, _request: Request<pb::CreateMemoryRequest>) -> Result<Response<pb::Memory>, Status> {
        not_yet("tmws.v1.MemoryService/CreateMemory")
    }

    async fn batch_create_memories(
        &self,
        _request: Request<pb::BatchCreateMemoriesRequest>,
    ) -> Result<Response<pb::BatchCreateMemoriesResponse>, Status> {
        not_yet("tmws.v1.MemoryService/BatchCreateMemories")
    }

    async fn get_memory(&self, _request: Request<pb::GetMemoryRequest>) -> Result<Response<pb::Memory>, Status> {
        not_yet("tmws.v1.MemoryService/GetMemory")
    }

    async fn update_memory(&self, _request: Request<pb::UpdateMemoryRequest>) -> Result<Response<pb::Memory>, Status> {
        not_yet("tmws.v1.MemoryService/UpdateMemory")
    }

    async fn delete_memory(
        &self,
        _request: Request<pb::DeleteMemoryRequest>,
    ) -> Result<Response<pb::DeleteMemoryResponse>, Status> {
        not_yet("tmws.v1.MemoryService/DeleteMemory")
    }

    async fn list_memories(
        &self,
        _request: Request<pb::ListMemoriesRequest>,
    ) -> Result<Response<pb::ListMemoriesResponse>, Status> {
        not_yet("tmws.v1.MemoryService/ListMemories")
    }

    async fn search_memories(
        &self,
        _request: Request<pb::SearchMemoriesRequest>,
    ) -> Result<Response<pb::SearchMemoriesResponse>, Status> {
        not_yet("tmws.v1.MemoryService/SearchMemories")
    }

    async fn share_memory(&self, _request: Request<pb::ShareMemoryRequest>) -> Result<Response<pb::Memory>, Status> {
        not_yet("tmws.v1.MemoryService/ShareMemory")
    }

    async fn prune_memories(
        &self,
        _request: Request<pb::PruneMemoriesRequest>,
    ) -> Result<Response<pb::PruneMemoriesResponse>, Status> {
        not_yet("tmws.v1.MemoryService/PruneMemories")
    }

    async fn get_memory_stats(
        &self,
        _request: Request<pb::GetMemoryStatsRequest>,
    ) -> Result<Response<pb::MemoryStats>, Status> {
        not_yet("tmws.v1.MemoryService/GetMemoryStats")
    }
}
