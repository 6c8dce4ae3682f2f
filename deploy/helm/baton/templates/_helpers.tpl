{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "baton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "baton.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* name-version for the helm.sh/chart label. */}}
{{- define "baton.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of one component's objects: call with (dict "root" $ "component" "gateway"). */}}
{{- define "baton.componentName" -}}
{{- printf "%s-%s" (include "baton.fullname" .root | trunc 52 | trimSuffix "-") .component }}
{{- end }}

{{/* Selector labels of the release, optionally of one component. */}}
{{- define "baton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "baton.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/* The recommended labels: call with (dict "root" $ "component" "gateway"); component may be empty. */}}
{{- define "baton.labels" -}}
helm.sh/chart: {{ include "baton.chart" .root }}
{{ include "baton.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: baton
{{- end }}

{{- define "baton.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "baton.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "baton.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding AMQP_URL and MONGODB_URL. */}}
{{- define "baton.secretName" -}}
{{- if .Values.connection.existingSecret }}
{{- .Values.connection.existingSecret }}
{{- else }}
{{- include "baton.fullname" . }}
{{- end }}
{{- end }}

{{/* The Secret holding BATON_AUTH_KEYS and BATON_AUTH_SIGNING_KEY. */}}
{{- define "baton.authSecretName" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else }}
{{- printf "%s-auth" (include "baton.fullname" . | trunc 58 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* The RabbitMQ queue KEDA watches. */}}
{{- define "baton.kedaQueueName" -}}
{{- if .Values.keda.queueName }}
{{- .Values.keda.queueName }}
{{- else if .Values.keda.taskType }}
{{- printf "%s.task.%s" .Values.config.queuePrefix .Values.keda.taskType }}
{{- else }}
{{- fail "keda.enabled needs keda.taskType (queue {config.queuePrefix}.task.{taskType}) or keda.queueName" }}
{{- end }}
{{- end }}

{{/*
A service's Deployment. Call with
(dict "root" $ "component" "gateway" "svc" .Values.gateway "portEnv" "BATON_PORT" "module" "services.gateway" "runScheduler" false).
*/}}
{{- define "baton.deployment" -}}
{{- $root := .root }}
{{- $svc := .svc }}
{{- $ctx := dict "root" $root "component" .component }}
{{- $kedaOwns := and $root.Values.keda.enabled (eq $root.Values.keda.target .component) }}
{{- $authed := and $root.Values.auth.enabled (eq .component "gateway") }}
{{- if and $kedaOwns $svc.autoscaling.enabled }}
{{- fail (printf "%s.autoscaling.enabled and keda.enabled (target %s) both scale the same Deployment; enable one" .component .component) }}
{{- end }}
{{- $minGrace := add 5 $root.Values.config.shutdownGraceSeconds }}
{{- if le (int $root.Values.terminationGracePeriodSeconds) (int $minGrace) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed the longest long poll (5 s) plus config.shutdownGraceSeconds (%v)" $root.Values.terminationGracePeriodSeconds $root.Values.config.shutdownGraceSeconds) }}
{{- end }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "baton.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "baton.labels" $ctx | nindent 4 }}
spec:
  {{- if not (or $svc.autoscaling.enabled $kedaOwns) }}
  replicas: {{ $svc.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "baton.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        {{- if not $root.Values.connection.existingSecret }}
        checksum/secret: {{ include (print $root.Template.BasePath "/secret.yaml") $root | sha256sum }}
        {{- end }}
        {{- if and $authed (not $root.Values.auth.existingSecret) }}
        checksum/auth-secret: {{ include (print $root.Template.BasePath "/auth-secret.yaml") $root | sha256sum }}
        {{- end }}
        {{- with $svc.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      labels:
        {{- include "baton.labels" $ctx | nindent 8 }}
        {{- with $svc.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      serviceAccountName: {{ include "baton.serviceAccountName" $root }}
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
      {{- with $root.Values.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "baton.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["python", "-m", {{ .module | quote }}]
          {{- with $root.Values.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            - name: http
              containerPort: {{ $svc.port }}
              protocol: TCP
          envFrom:
            - configMapRef:
                name: {{ include "baton.fullname" $root }}
          env:
            - name: AMQP_URL
              valueFrom:
                secretKeyRef:
                  name: {{ include "baton.secretName" $root }}
                  key: {{ $root.Values.connection.amqpUrlKey }}
            - name: MONGODB_URL
              valueFrom:
                secretKeyRef:
                  name: {{ include "baton.secretName" $root }}
                  key: {{ $root.Values.connection.mongodbUrlKey }}
            - name: {{ .portEnv }}
              value: {{ $svc.port | quote }}
            {{- if eq .component "gateway" }}
            - name: BATON_RUN_SCHEDULER
              value: "false"
            {{- end }}
            {{- if $authed }}
            - name: BATON_AUTH_KEYS
              valueFrom:
                secretKeyRef:
                  name: {{ include "baton.authSecretName" $root }}
                  key: {{ $root.Values.auth.keysKey }}
            - name: BATON_AUTH_SIGNING_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ include "baton.authSecretName" $root }}
                  key: {{ $root.Values.auth.signingKeyKey }}
            - name: BATON_AUTH_TOKEN_TTL_SECONDS
              value: {{ $root.Values.auth.tokenTtlSeconds | quote }}
            {{- end }}
            {{- with $svc.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          startupProbe:
            httpGet:
              path: /health
              port: http
            {{- toYaml $root.Values.probes.startup | nindent 12 }}
          livenessProbe:
            httpGet:
              path: /health
              port: http
            {{- toYaml $root.Values.probes.liveness | nindent 12 }}
          readinessProbe:
            httpGet:
              path: /ready
              port: http
            {{- toYaml $root.Values.probes.readiness | nindent 12 }}
          resources:
            {{- toYaml $svc.resources | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: data
              mountPath: /data
      volumes:
        - name: tmp
          emptyDir: {}
        - name: data
          emptyDir: {}
      {{- with $svc.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $svc.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $svc.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/* A service's PodDisruptionBudget; same arguments as baton.deployment. */}}
{{- define "baton.pdb" -}}
{{- $ctx := dict "root" .root "component" .component }}
{{- $pdb := .svc.podDisruptionBudget }}
{{- if $pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "baton.componentName" $ctx }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "baton.labels" $ctx | nindent 4 }}
spec:
  {{- if hasKey $pdb "maxUnavailable" }}
  maxUnavailable: {{ $pdb.maxUnavailable }}
  {{- else }}
  minAvailable: {{ $pdb.minAvailable | default 1 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "baton.selectorLabels" $ctx | nindent 6 }}
{{- end }}
{{- end }}

{{/* A service's HorizontalPodAutoscaler; same arguments as baton.deployment. */}}
{{- define "baton.hpa" -}}
{{- $ctx := dict "root" .root "component" .component }}
{{- $as := .svc.autoscaling }}
{{- if $as.enabled }}
{{- if gt (int $as.minReplicas) (int $as.maxReplicas) }}
{{- fail (printf "%s.autoscaling.minReplicas (%v) is greater than maxReplicas (%v)" .component $as.minReplicas $as.maxReplicas) }}
{{- end }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "baton.componentName" $ctx }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "baton.labels" $ctx | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "baton.componentName" $ctx }}
  minReplicas: {{ $as.minReplicas }}
  maxReplicas: {{ $as.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $as.targetCPUUtilizationPercentage }}
{{- end }}
{{- end }}
