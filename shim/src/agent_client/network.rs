//! The networking calls of the agent API: the guest NIC's addresses and MTU,
//! and the pod's routes.

use husk_protocol::agent::{IpAddress, Route, UpdateInterfaceRequest, UpdateRoutesRequest};

use super::{AgentClient, AgentError};

fn rpc(call: &'static str) -> impl FnOnce(ttrpc::Error) -> AgentError {
    move |source| AgentError::Rpc { call, source }
}

/// A route for [`AgentClient::update_routes`]; empty strings mean "none".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestRoute {
    /// CIDR; empty for the default route.
    pub destination: String,
    pub gateway: String,
    /// The guest interface name.
    pub device: String,
}

impl AgentClient {
    /// Gives the guest interface with `mac` the addresses (address, prefix
    /// length) and MTU (0 keeps it), brings it up; returns its guest name.
    pub async fn update_interface(
        &self,
        mac: &str,
        addresses: &[(String, u32)],
        mtu: u32,
    ) -> Result<String, AgentError> {
        let req = UpdateInterfaceRequest {
            mac: mac.into(),
            addresses: addresses
                .iter()
                .map(|(a, p)| IpAddress {
                    address: a.clone(),
                    prefix_len: *p,
                    ..Default::default()
                })
                .collect(),
            mtu,
            ..Default::default()
        };
        self.inner
            .update_interface(self.ctx(), &req)
            .await
            .map(|r| r.name)
            .map_err(rpc("UpdateInterface"))
    }

    /// Adds the routes, in order.
    pub async fn update_routes(&self, routes: &[GuestRoute]) -> Result<(), AgentError> {
        let req = UpdateRoutesRequest {
            routes: routes
                .iter()
                .map(|r| Route {
                    destination: r.destination.clone(),
                    gateway: r.gateway.clone(),
                    device: r.device.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        self.inner
            .update_routes(self.ctx(), &req)
            .await
            .map(|_| ())
            .map_err(rpc("UpdateRoutes"))
    }
}
