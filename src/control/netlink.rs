//! The link-local interface (`nodelocaldns`) and its listen addresses, over rtnetlink.
//!
//! Runs on: control side (the `ringdns-node` thread; every call may block on the kernel).
//!
//! [`LinkLocal::ensure`] creates the interface (kind dummy; a port-less bridge where the kernel
//! has no dummy driver), sets it up and adds every listen IP (IPv4 /32, IPv6 /128 with `nodad`
//! so it is usable at once). It is idempotent and is called again on every sync. What ringdns
//! created or added is remembered in memory, so [`LinkLocal::teardown`] removes exactly that: the
//! whole interface if ringdns created it, otherwise only the addresses it added. An interface
//! ringdns did not create is never set up, down or deleted. Ownership survives a restart
//! through the interface's alias ([`OWNER_ALIAS`]): after a `kill -9`, the next instance adopts
//! the interface its predecessor created instead of treating it as foreign.
//!
//! Messages are built with `netlink-packet-route` and sent on a plain blocking `netlink-sys`
//! socket: one request at a time, each acknowledged (`NLM_F_ACK`) or a dump ended by `DONE`.
#![forbid(unsafe_code)]

use std::fmt;
use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr as NetlinkAddr};

/// `EEXIST`: the link or address is already there (another agent raced us).
const EEXIST: i32 = libc::EEXIST;

/// `ENODEV`: no interface with that name or index.
const ENODEV: i32 = libc::ENODEV;

/// `EADDRNOTAVAIL`: deleting an address that is not there.
const EADDRNOTAVAIL: i32 = libc::EADDRNOTAVAIL;

/// `EOPNOTSUPP`: `RTM_NEWLINK` of a kind whose driver the kernel lacks (no `dummy` module).
const EOPNOTSUPP: i32 = libc::EOPNOTSUPP;

/// `IFLA_IFALIAS` ringdns sets on the interface it creates. An interface carrying it (left by
/// an instance that was killed, or handed over with `teardown = false`) is ringdns' own: the
/// next instance adopts it, so its teardown still removes it. Shown by `ip link` as `alias`.
pub const OWNER_ALIAS: &str = "ringdns";

/// Size of `struct nlmsghdr`: the smallest valid netlink message.
const NETLINK_HEADER_LEN: usize = 16;

/// The kind of link ringdns creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// `dummy`, as node-cache creates.
    Dummy,
    /// `bridge` with no ports: the fallback where the kernel has no dummy driver. Local
    /// addresses on it work the same; it never forwards anything because it has no ports.
    Bridge,
}

/// What one [`LinkLocal::ensure`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// The interface was missing and ringdns created it (with every address).
    Created {
        /// The kind it was created as.
        kind: LinkKind,
    },
    /// The interface was there; `addresses_added` missing addresses were put back (0 = all
    /// present), `set_up` says whether ringdns' own interface had to be set up again.
    AlreadyThere {
        /// Listen IPs that were missing and have been added.
        addresses_added: usize,
        /// ringdns' own interface was down and has been set up.
        set_up: bool,
    },
}

impl Ensured {
    /// Whether anything had to be (re)done: a sync that changed something logs it.
    pub fn changed(&self) -> bool {
        !matches!(
            self,
            Ensured::AlreadyThere {
                addresses_added: 0,
                set_up: false
            }
        )
    }
}

/// Which netlink operation failed; decides the `errortype` label it is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Opening or binding the netlink socket.
    Open,
    /// `RTM_GETLINK` by name.
    LookUpLink,
    /// `RTM_GETADDR` dump.
    ListAddresses,
    /// `RTM_NEWLINK` (create).
    CreateLink,
    /// `RTM_NEWLINK` setting `IFF_UP`.
    SetUp,
    /// `RTM_NEWADDR`.
    AddAddress,
    /// `RTM_DELLINK`.
    DeleteLink,
    /// `RTM_DELADDR`.
    DeleteAddress,
}

impl Operation {
    /// Whether this only looked (`interface_check`) rather than changed something
    /// (`interface_add`), as node-cache splits `coredns_nodecache_setup_errors_total`.
    pub fn is_check(self) -> bool {
        matches!(
            self,
            Operation::Open | Operation::LookUpLink | Operation::ListAddresses
        )
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Open => "opening a netlink socket",
            Operation::LookUpLink => "looking up the interface",
            Operation::ListAddresses => "listing addresses",
            Operation::CreateLink => "creating the interface",
            Operation::SetUp => "setting the interface up",
            Operation::AddAddress => "adding an address",
            Operation::DeleteLink => "deleting the interface",
            Operation::DeleteAddress => "deleting an address",
        })
    }
}

/// A netlink request that failed. Retrying on the next sync can help when another agent was
/// changing the same interface; a missing capability (`EPERM`) stays until the pod spec changes.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket itself failed (open, bind, send, receive).
    #[error("{interface}: {operation}: {source}")]
    Io {
        /// The interface name.
        interface: String,
        /// What was being done.
        operation: Operation,
        /// The system error.
        source: io::Error,
    },
    /// The kernel answered with an error code.
    #[error("{interface}: {operation}: {}", io::Error::from_raw_os_error(*errno))]
    Kernel {
        /// The interface name.
        interface: String,
        /// What was being done.
        operation: Operation,
        /// The positive errno (`EPERM`, `EEXIST`, …).
        errno: i32,
    },
    /// The kernel's answer could not be decoded.
    #[error("{interface}: {operation}: undecodable netlink answer")]
    Decode {
        /// The interface name.
        interface: String,
        /// What was being done.
        operation: Operation,
    },
}

impl NetlinkError {
    /// The operation that failed.
    pub fn operation(&self) -> Operation {
        match self {
            NetlinkError::Io { operation, .. }
            | NetlinkError::Kernel { operation, .. }
            | NetlinkError::Decode { operation, .. } => *operation,
        }
    }

    /// Whether a later sync may succeed (everything but a missing capability).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, NetlinkError::Kernel { errno, .. } if *errno == libc::EPERM)
    }
}

/// The link-local interface ringdns manages and what it has done to it.
///
/// # Threads
///
/// Owned by the one thread that runs the node sync; not shared.
pub struct LinkLocal {
    /// Interface name (`node.interface`).
    name: String,
    /// Every listen IP, deduplicated, in config order.
    addrs: Vec<IpAddr>,
    /// ringdns created the interface (so teardown deletes it whole).
    created: Option<LinkKind>,
    /// Addresses ringdns added to an interface it did not create (teardown deletes only these).
    added: Vec<IpAddr>,
    /// The rtnetlink socket, connected to the kernel.
    socket: Socket,
    /// Sequence number of the last request.
    sequence: u32,
}

impl fmt::Debug for LinkLocal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkLocal")
            .field("name", &self.name)
            .field("addrs", &self.addrs)
            .field("created", &self.created)
            .field("added", &self.added)
            .finish_non_exhaustive()
    }
}

/// One link as the kernel reported it.
#[derive(Debug, Clone, Copy)]
struct Link {
    /// Interface index.
    index: u32,
    /// `IFF_UP` is set.
    up: bool,
    /// Created by a ringdns (its alias is [`OWNER_ALIAS`]), of this kind.
    owned: Option<LinkKind>,
}

impl LinkLocal {
    /// Opens an rtnetlink socket for managing interface `name` with addresses `addrs`
    /// (duplicates ignored). Changes nothing yet.
    pub fn open(name: &str, addrs: impl IntoIterator<Item = IpAddr>) -> Result<Self, NetlinkError> {
        let io_error = |source| NetlinkError::Io {
            interface: name.to_owned(),
            operation: Operation::Open,
            source,
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(io_error)?;
        socket.bind_auto().map_err(io_error)?;
        socket.connect(&NetlinkAddr::new(0, 0)).map_err(io_error)?;
        let mut unique = Vec::new();
        for addr in addrs {
            if !unique.contains(&addr) {
                unique.push(addr);
            }
        }
        Ok(Self {
            name: name.to_owned(),
            addrs: unique,
            created: None,
            added: Vec::new(),
            socket,
            sequence: 0,
        })
    }

    /// Replaces the addresses [`LinkLocal::ensure`] puts on the interface (reload). Addresses
    /// no longer listed are left on the interface until teardown, which still removes them.
    pub fn set_addresses(&mut self, addrs: impl IntoIterator<Item = IpAddr>) {
        self.addrs.clear();
        for addr in addrs {
            if !self.addrs.contains(&addr) {
                self.addrs.push(addr);
            }
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The kind ringdns created the interface as, `None` if it did not create it.
    pub fn created(&self) -> Option<LinkKind> {
        self.created
    }

    /// Makes sure the interface exists, is up (if it is ringdns' own) and has every address.
    /// Never duplicates an address; never touches an interface it did not create beyond
    /// adding missing addresses.
    pub fn ensure(&mut self) -> Result<Ensured, NetlinkError> {
        let link = match self.look_up()? {
            Some(link) => link,
            None => {
                let kind = self.create()?;
                let link = self
                    .look_up()?
                    .ok_or_else(|| self.kernel(Operation::LookUpLink, ENODEV))?;
                // The kernel applies IFLA_IFALIAS only to an existing link, so the ownership
                // mark (and, to be sure, IFF_UP) is set in a second request.
                self.mark_owned_and_up(link.index)?;
                for addr in self.addrs.clone() {
                    self.add_address(link.index, addr)?;
                }
                return Ok(Ensured::Created { kind });
            }
        };
        if self.created.is_none() {
            if let Some(kind) = link.owned {
                log::info!(
                    "interface adopted name={} kind={kind:?} (created by an earlier ringdns)",
                    self.name
                );
                self.created = Some(kind);
            }
        }
        let mut set_up = false;
        if self.created.is_some() && !link.up {
            self.set_up(link.index)?;
            set_up = true;
        }
        let present = self.addresses(link.index)?;
        let mut addresses_added = 0;
        for addr in self.addrs.clone() {
            if present.contains(&addr) {
                continue;
            }
            if self.add_address(link.index, addr)? {
                addresses_added += 1;
                if self.created.is_none() && !self.added.contains(&addr) {
                    self.added.push(addr);
                }
            }
        }
        Ok(Ensured::AlreadyThere {
            addresses_added,
            set_up,
        })
    }

    /// Whether the interface exists with every address (for the `interface_check` path and
    /// for `/ready`): looks only, changes nothing.
    pub fn is_complete(&mut self) -> Result<bool, NetlinkError> {
        let Some(link) = self.look_up()? else {
            return Ok(false);
        };
        let present = self.addresses(link.index)?;
        Ok(self.addrs.iter().all(|addr| present.contains(addr)))
    }

    /// Removes what ringdns set up: the whole interface if it created it, else only the
    /// addresses it added. Already-gone things are not errors.
    pub fn teardown(&mut self) -> Result<(), NetlinkError> {
        let Some(link) = self.look_up()? else {
            self.created = None;
            self.added.clear();
            return Ok(());
        };
        if self.created.is_some() {
            let mut message = LinkMessage::default();
            message.header.index = link.index;
            match self.request(
                Operation::DeleteLink,
                RouteNetlinkMessage::DelLink(message),
                NLM_F_ACK,
            ) {
                Ok(_) => {}
                Err(NetlinkError::Kernel { errno: ENODEV, .. }) => {}
                Err(error) => return Err(error),
            }
            self.created = None;
            self.added.clear();
            return Ok(());
        }
        for addr in std::mem::take(&mut self.added) {
            let message = address_message(link.index, addr);
            match self.request(
                Operation::DeleteAddress,
                RouteNetlinkMessage::DelAddress(message),
                NLM_F_ACK,
            ) {
                Ok(_) => {}
                Err(NetlinkError::Kernel {
                    errno: EADDRNOTAVAIL | ENODEV,
                    ..
                }) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// The interface by name, `None` if there is none.
    fn look_up(&mut self) -> Result<Option<Link>, NetlinkError> {
        let mut message = LinkMessage::default();
        message
            .attributes
            .push(LinkAttribute::IfName(self.name.clone()));
        let answers = match self.request(
            Operation::LookUpLink,
            RouteNetlinkMessage::GetLink(message),
            NLM_F_ACK,
        ) {
            Ok(answers) => answers,
            Err(NetlinkError::Kernel { errno: ENODEV, .. }) => return Ok(None),
            Err(error) => return Err(error),
        };
        Ok(answers.into_iter().find_map(|answer| match answer {
            RouteNetlinkMessage::NewLink(link) => Some(Link {
                index: link.header.index,
                up: link.header.flags.contains(LinkFlags::Up),
                owned: owned_kind(&link),
            }),
            _ => None,
        }))
    }

    /// Creates the interface up, as dummy or, without a dummy driver, as a port-less bridge.
    fn create(&mut self) -> Result<LinkKind, NetlinkError> {
        match self.new_link(InfoKind::Dummy) {
            Ok(()) => {
                log::info!("interface created name={} kind=dummy", self.name);
                self.created = Some(LinkKind::Dummy);
                Ok(LinkKind::Dummy)
            }
            Err(NetlinkError::Kernel {
                errno: EOPNOTSUPP, ..
            }) => {
                self.new_link(InfoKind::Bridge)?;
                log::warn!(
                    "interface created name={} kind=bridge (the kernel has no dummy driver; a bridge without ports serves the same local addresses)",
                    self.name
                );
                self.created = Some(LinkKind::Bridge);
                Ok(LinkKind::Bridge)
            }
            Err(error) => Err(error),
        }
    }

    /// `RTM_NEWLINK` of `kind`, created up; fails with `EEXIST` rather than touching an
    /// interface that appeared meanwhile.
    fn new_link(&mut self, kind: InfoKind) -> Result<(), NetlinkError> {
        let mut message = LinkMessage::default();
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        message
            .attributes
            .push(LinkAttribute::IfName(self.name.clone()));
        message
            .attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]));
        self.request(
            Operation::CreateLink,
            RouteNetlinkMessage::NewLink(message),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Sets `IFF_UP` and the [`OWNER_ALIAS`] on interface `index`, which ringdns just created.
    fn mark_owned_and_up(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        message
            .attributes
            .push(LinkAttribute::IfAlias(OWNER_ALIAS.to_owned()));
        self.request(
            Operation::SetUp,
            RouteNetlinkMessage::NewLink(message),
            NLM_F_ACK,
        )
        .map(drop)
    }

    /// Sets `IFF_UP` on interface `index` (only ever ringdns' own).
    fn set_up(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        self.request(
            Operation::SetUp,
            RouteNetlinkMessage::NewLink(message),
            NLM_F_ACK,
        )
        .map(drop)
    }

    /// The addresses on interface `index`.
    fn addresses(&mut self, index: u32) -> Result<Vec<IpAddr>, NetlinkError> {
        let answers = self.request(
            Operation::ListAddresses,
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        let mut found = Vec::new();
        for answer in answers {
            let RouteNetlinkMessage::NewAddress(message) = answer else {
                continue;
            };
            if message.header.index != index {
                continue;
            }
            // IFA_LOCAL is the local address (IFA_ADDRESS is the peer on point-to-point
            // links); IPv6 sends only IFA_ADDRESS.
            let local = message
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
            let address = message
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
            if let Some(ip) = local.or(address) {
                found.push(ip);
            }
        }
        Ok(found)
    }

    /// Adds `addr` to interface `index`; `Ok(false)` if it turned out to be there already.
    fn add_address(&mut self, index: u32, addr: IpAddr) -> Result<bool, NetlinkError> {
        let message = address_message(index, addr);
        match self.request(
            Operation::AddAddress,
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(_) => Ok(true),
            Err(NetlinkError::Kernel { errno: EEXIST, .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// A [`NetlinkError::Kernel`] for `operation`.
    fn kernel(&self, operation: Operation, errno: i32) -> NetlinkError {
        NetlinkError::Kernel {
            interface: self.name.clone(),
            operation,
            errno,
        }
    }

    /// Sends one request with `flags` (plus `NLM_F_REQUEST`) and collects the answers until
    /// the ACK (or, for a dump, `DONE`). A negative ACK is a [`NetlinkError::Kernel`].
    fn request(
        &mut self,
        operation: Operation,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        let io_error = |source| NetlinkError::Io {
            interface: self.name.clone(),
            operation,
            source,
        };
        self.socket.send(&bytes, 0).map_err(io_error)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut answers = Vec::new();
        loop {
            let (datagram, _) = self.socket.recv_from_full().map_err(io_error)?;
            let mut rest = datagram.as_slice();
            while !rest.is_empty() {
                let length = NetlinkBuffer::new_checked(rest)
                    .map(|buffer| buffer.length() as usize)
                    .map_err(|_| self.decode(operation))?;
                if length < NETLINK_HEADER_LEN {
                    return Err(self.decode(operation));
                }
                let (this, tail) = rest
                    .split_at_checked(length)
                    .ok_or_else(|| self.decode(operation))?;
                // Netlink messages are 4-byte aligned within a datagram.
                rest = tail
                    .get(length.next_multiple_of(4) - length..)
                    .unwrap_or(&[]);
                let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(this)
                    .map_err(|_| self.decode(operation))?;
                if parsed.header.sequence_number != sequence {
                    continue;
                }
                match parsed.payload {
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(error) => match error.code {
                        None if !dump => return Ok(answers),
                        None => {}
                        Some(code) => return Err(self.kernel(operation, -code.get())),
                    },
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    _ => {}
                }
            }
        }
    }

    /// A [`NetlinkError::Decode`] for `operation`.
    fn decode(&self, operation: Operation) -> NetlinkError {
        NetlinkError::Decode {
            interface: self.name.clone(),
            operation,
        }
    }
}

/// The kind of `link` if a ringdns created it: alias [`OWNER_ALIAS`] and kind dummy or bridge.
fn owned_kind(link: &LinkMessage) -> Option<LinkKind> {
    let alias = link.attributes.iter().any(
        |attribute| matches!(attribute, LinkAttribute::IfAlias(alias) if alias == OWNER_ALIAS),
    );
    if !alias {
        return None;
    }
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
                LinkInfo::Kind(InfoKind::Dummy) => Some(LinkKind::Dummy),
                LinkInfo::Kind(InfoKind::Bridge) => Some(LinkKind::Bridge),
                _ => None,
            }),
            _ => None,
        })
}

/// The `RTM_NEWADDR`/`RTM_DELADDR` body for `addr` as a host address on interface `index`:
/// /32 or /128, IPv6 with `nodad` so it is usable at once (no duplicate address detection on
/// an address that only this node answers on).
fn address_message(index: u32, addr: IpAddr) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.index = index;
    message.header.scope = AddressScope::Universe;
    match addr {
        IpAddr::V4(_) => {
            message.header.family = AddressFamily::Inet;
            message.header.prefix_len = 32;
            message.attributes.push(AddressAttribute::Local(addr));
            message.attributes.push(AddressAttribute::Address(addr));
        }
        IpAddr::V6(_) => {
            message.header.family = AddressFamily::Inet6;
            message.header.prefix_len = 128;
            message.header.flags = AddressHeaderFlags::Nodad;
            message.attributes.push(AddressAttribute::Address(addr));
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
    }
    message
}
