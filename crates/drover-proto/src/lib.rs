//! drover's wire contract, generated from `proto/drover/v1/drover.proto`.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("drover.v1");
}

/// The encoded file descriptor set of drover's protos, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/drover_descriptor.bin"));

mod convert;
pub use convert::ConvertError;
