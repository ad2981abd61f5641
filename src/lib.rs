//! ringdns
